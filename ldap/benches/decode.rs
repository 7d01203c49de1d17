//! Allocations per attribute value when decoding search result entries, over the frames
//! captured from slapd in `fuzz/corpus/slapd-*.ber` (run: `cargo bench -p ldap --bench
//! decode`; `scripts/bench.sh listener` runs it too). A counting global allocator measures
//! the zero-copy search path module initialisation uses (framing the received bytes and
//! `frame::parse_message`, then the copy into the listener's `RawEntry`), and, for
//! reference, the steps of the ldap3 path the per-change reads still take: lber's parse
//! (ldap3's codec), the deep copy ldap3's codec makes of every parsed message, and our
//! `parse_entry`; ldap3's `SearchEntry::construct` too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use ldap::frame::{Response, frame_len, parse_message};
use ldap3::asn1::{PL, TagClass, parse_tag};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let out = f();
    (out, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

fn main() {
    let frames: Vec<Vec<u8>> = support::corpus()
        .into_iter()
        .filter(|(name, _)| name.starts_with("slapd-"))
        .map(|(_, data)| data)
        .collect();
    let rounds = 20;
    let (mut values, mut entries) = (0u64, 0u64);
    let (mut parse, mut copy, mut ours, mut construct) = (0u64, 0u64, 0u64, 0u64);
    // The same for UCS-sized entries alone, without the 10,000-value group.
    let (mut small_values, mut small_total) = (0u64, 0u64);
    let mut elapsed = std::time::Duration::ZERO;
    // The zero-copy path: all frames in one receive buffer, as the search connection reads
    // them (that buffer's allocation is the reader's, per 128 KiB, not counted here).
    let (mut framed, mut framed_small, mut to_raw) = (0u64, 0u64, 0u64);
    let mut framed_elapsed = std::time::Duration::ZERO;
    let stream: Vec<u8> = frames.iter().flatten().copied().collect();
    for _ in 0..rounds {
        let mut buf = BytesMut::from(&stream[..]);
        while !buf.is_empty() {
            let start = Instant::now();
            let (message, n) = counted(|| {
                let len = frame_len(&buf).unwrap().unwrap();
                parse_message(buf.split_to(len).freeze()).unwrap()
            });
            framed_elapsed += start.elapsed();
            framed += n;
            if let Response::Entry(entry) = message.op {
                if entry.value_count() < 1000 {
                    framed_small += n;
                }
                let (_, n) = counted(|| entry.into_raw());
                to_raw += n;
            }
        }
    }
    for _ in 0..rounds {
        for frame in &frames {
            let (tag, parse_n) = counted(|| parse_tag(frame).unwrap().1);
            parse += parse_n;
            let (copied, copy_n) = counted(|| tag.clone());
            copy += copy_n;
            drop(tag);
            let PL::C(mut parts) = copied.payload else {
                panic!("not a message")
            };
            let op = parts.swap_remove(1);
            if op.class != TagClass::Application || op.id != 4 {
                continue;
            }
            let reference = ldap3::ResultEntry::new(op.clone());
            let start = Instant::now();
            let (entry, n) = counted(|| ldap::decode::parse_entry(ldap3::ResultEntry::new(op)));
            elapsed += start.elapsed();
            ours += n;
            let entry = entry.unwrap();
            entries += 1;
            let count = entry.attrs.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
            values += count;
            if count < 1000 {
                small_values += count;
                small_total += parse_n + copy_n + n;
            }
            let (_, n) = counted(|| ldap3::SearchEntry::construct(reference));
            construct += n;
        }
    }
    let per = |n: u64| n as f64 / values as f64;
    println!(
        "decode benchmark: {} entries, {} attribute values per round, {rounds} rounds (load {})",
        entries / rounds,
        values / rounds,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("allocations per attribute value, zero-copy search path (listener -i):");
    println!(
        "    framing + parse_message         {:>8.3}   (goal <= 0.1)",
        per(framed)
    );
    println!(
        "    the same, UCS-sized entries     {:>8.3}",
        framed_small as f64 / small_values as f64
    );
    println!(
        "    copy into RawEntry (cache form) {:>8.3}   (values owned by the cache)",
        per(to_raw)
    );
    println!("allocations per attribute value, ldap3 path (per-change reads; reference):");
    println!("    lber parse (ldap3's codec)      {:>8.3}", per(parse));
    println!("    deep copy in ldap3's codec      {:>8.3}", per(copy));
    println!("    our parse_entry                 {:>8.3}", per(ours));
    println!(
        "    total on the ldap3 path         {:>8.3}",
        per(parse + copy + ours)
    );
    println!(
        "    total, UCS-sized entries only   {:>8.3}   ({} values without the 10,000-value group)",
        small_total as f64 / small_values as f64,
        small_values / rounds
    );
    println!(
        "    ldap3 SearchEntry::construct    {:>8.3}   (reference, instead of parse_entry)",
        per(construct)
    );
    println!(
        "time per value: parse_message {:.1} ns, parse_entry {:.1} ns (after ldap3's parse)",
        framed_elapsed.as_nanos() as f64 / values as f64,
        elapsed.as_nanos() as f64 / values as f64
    );
}
