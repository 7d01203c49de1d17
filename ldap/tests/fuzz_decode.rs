//! The decoders under random mutation, for a bounded time: a stable-Rust stand-in for a
//! `cargo fuzz` target (which needs a nightly toolchain).
//!
//! Inputs start from the committed corpus in `fuzz/corpus/` (frames captured from slapd by
//! `decode_like_ldap3`, hand-made malformed frames and syncrepl messages). Each round
//! mutates one of them either as bytes (reaching BER parsing as ldap3's codec does it, then
//! our decoders) or as a parsed BER tree (reaching our decoders with every kind of wrong
//! structure), and runs `parse_entry`, `sync_state` and `parse_sync_info` on the result:
//! errors are fine, panics are not. A panicking input is written to the test's temporary
//! directory for reproduction.
//!
//! A second test drives the zero-copy framer and walker of the search connection
//! (`frame::frame_len`, `frame::parse_message`) the same way, with every mutated input
//! (not only those ldap3 accepts) fed as a byte stream in random chunks, plus truncated
//! frames, huge lengths and deep nesting.
//!
//! `UDR_FUZZ_SECONDS` sets the duration (default 5; CI runs 60), `UDR_FUZZ_SEED` the seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ldap::decode::{parse_entry, parse_sync_info, sync_state};
use ldap::frame::{FrameError, frame_len, parse_message};
use ldap3::ResultEntry;
use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag, write};
use support::{corpus, message};

/// xorshift64*: deterministic for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn byte(&mut self) -> u8 {
        const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0x81, 0x84, 0xc3, 0xff];
        if self.below(2) == 0 {
            INTERESTING[self.below(INTERESTING.len())]
        } else {
            self.next() as u8
        }
    }
}

/// Inputs larger than this are cut: lber parses recursively, and the biggest captured frame
/// (10,000 values) is well below it.
const MAX_INPUT: usize = 1 << 20;

fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..=rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.byte();
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            2 => {
                let at = rng.below(len + 1);
                let bytes: Vec<u8> = (0..=rng.below(8)).map(|_| rng.byte()).collect();
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = rng.below((len - at).min(64) + 1);
                data.drain(at..at + n);
            }
            4 => data.truncate(rng.below(len + 1)),
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = rng.below((other.len() - from).min(256) + 1);
                let at = rng.below(len + 1);
                data.splice(at..at, other[from..from + n].iter().copied());
            }
            _ => {
                // Lengths are where decoders go wrong: bump a byte that follows a tag.
                if len > 2 {
                    let i = 1 + rng.below(len - 1);
                    data[i] = data[i].wrapping_add(1 + rng.below(3) as u8);
                }
            }
        }
    }
    data.truncate(MAX_INPUT);
}

/// Every node of `tag`, depth first, as a path of child positions.
fn paths(tag: &StructureTag, prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    out.push(prefix.clone());
    if let PL::C(children) = &tag.payload {
        for (i, child) in children.iter().enumerate() {
            prefix.push(i);
            paths(child, prefix, out);
            prefix.pop();
        }
    }
}

fn node<'t>(tag: &'t mut StructureTag, path: &[usize]) -> &'t mut StructureTag {
    match path.split_first() {
        None => tag,
        Some((&i, rest)) => match &mut tag.payload {
            PL::C(children) => node(&mut children[i], rest),
            PL::P(_) => unreachable!("paths only lead through constructed nodes"),
        },
    }
}

fn mutate_tree(rng: &mut Rng, tag: &mut StructureTag) {
    for _ in 0..=rng.below(3) {
        let mut all = Vec::new();
        paths(tag, &mut Vec::new(), &mut all);
        let target = node(tag, &all[rng.below(all.len())]);
        match rng.below(7) {
            0 => {
                target.payload = match std::mem::replace(&mut target.payload, PL::P(Vec::new())) {
                    PL::P(bytes) => {
                        PL::C(parse_tag(&bytes).map(|(_, t)| vec![t]).unwrap_or_default())
                    }
                    PL::C(_) => PL::P((0..rng.below(20)).map(|_| rng.byte()).collect()),
                }
            }
            1 => target.id = [0, 1, 2, 3, 4, 10, 25, 99][rng.below(8)],
            2 => {
                target.class = [
                    TagClass::Universal,
                    TagClass::Application,
                    TagClass::Context,
                    TagClass::Private,
                ][rng.below(4)]
            }
            3 => {
                if let PL::C(children) = &mut target.payload {
                    children.truncate(rng.below(children.len() + 1));
                }
            }
            4 => {
                if let PL::C(children) = &mut target.payload
                    && !children.is_empty()
                {
                    let copy = children[rng.below(children.len())].clone();
                    children.insert(rng.below(children.len() + 1), copy);
                }
            }
            5 => {
                if let PL::P(bytes) = &mut target.payload {
                    mutate_bytes(rng, bytes, &[]);
                }
            }
            _ => {
                if let PL::C(children) = &mut target.payload {
                    children.push(StructureTag {
                        class: TagClass::Universal,
                        id: 4,
                        payload: PL::P((0..rng.below(10)).map(|_| rng.byte()).collect()),
                    });
                }
            }
        }
    }
}

fn decode_all(entry: ResultEntry) {
    let _ = sync_state(&entry);
    let _ = parse_sync_info(&entry);
    let _ = parse_entry(entry);
}

fn settings() -> (u64, u64) {
    let seconds: u64 = std::env::var("UDR_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("UDR_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1da7);
    (seconds, seed)
}

#[test]
fn decoders_survive_mutated_frames() {
    let (seconds, seed) = settings();
    let inputs = corpus();
    assert!(inputs.len() > 40, "the corpus is missing");
    // The unmutated corpus first: captured frames decode, hand-made bad ones fail cleanly.
    for (name, data) in &inputs {
        let decoded = message(data).map(|m| {
            let is_entry = m.0.class == TagClass::Application && m.0.id == 4;
            (is_entry, parse_entry(m).is_ok())
        });
        if name.starts_with("slapd-") || name.starts_with("ok-") {
            assert!(
                decoded.is_some_and(|(is_entry, ok)| !is_entry || ok),
                "{name}"
            );
        }
    }

    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rounds = 0u64;
    let mut reached = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            rounds += 1;
            let (_, base) = &inputs[rng.below(inputs.len())];
            let (_, other) = &inputs[rng.below(inputs.len())];
            let mut data = base.clone();
            let by_tree = rng.below(2) == 0;
            let input = if by_tree {
                // A tree mutation of the frame's parsed operation.
                let Some(mut entry) = message(&data) else {
                    continue;
                };
                mutate_tree(&mut rng, &mut entry.0);
                entry
            } else {
                mutate_bytes(&mut rng, &mut data, other);
                let Some(entry) = message(&data) else {
                    continue;
                };
                entry
            };
            reached += 1;
            let kept = input.clone();
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| decode_all(input))) {
                let path = std::env::temp_dir().join(format!("udr-fuzz-crash-{seed}-{rounds}"));
                std::fs::write(&path, format!("{kept:?}\nbytes: {data:?}\n")).unwrap();
                eprintln!("panicking input written to {}", path.display());
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!("{rounds} rounds, {reached} reached the decoders (seed {seed})");
    assert!(
        reached > 1000,
        "too few inputs reached the decoders: {reached}"
    );
}

/// Feeds `stream` to the framer in chunks of random size, as the search connection reads
/// it, decoding every complete frame; stops at the first error. The number of messages.
fn decode_stream(rng: &mut Rng, stream: &[u8]) -> Result<usize, FrameError> {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut messages = 0;
    loop {
        match frame_len(&buf)? {
            Some(len) if buf.len() >= len => {
                parse_message(buf.split_to(len).freeze())?;
                messages += 1;
                continue;
            }
            _ if fed == stream.len() => return Ok(messages),
            _ => {}
        }
        let n = (1 + rng.below(4096)).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
    }
}

/// `op` (a parsed protocol operation) in an LDAPMessage envelope, as BER bytes.
fn envelope(op: StructureTag) -> Vec<u8> {
    let message = StructureTag {
        class: TagClass::Universal,
        id: 16,
        payload: PL::C(vec![
            StructureTag {
                class: TagClass::Universal,
                id: 2,
                payload: PL::P(vec![5]),
            },
            op,
        ]),
    };
    let mut buf = BytesMut::new();
    write::encode_into(&mut buf, message).unwrap();
    buf.to_vec()
}

/// Runs `f`, writing `data` next to the seed and round if it panics.
fn no_panic(seed: u64, rounds: u64, data: &[u8], f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        let path = std::env::temp_dir().join(format!("udr-fuzz-frame-crash-{seed}-{rounds}"));
        std::fs::write(&path, data).unwrap();
        eprintln!("panicking input written to {}", path.display());
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn framer_survives_mutated_streams() {
    let (seconds, seed) = settings();
    let inputs = corpus();
    let mut rng = Rng(seed | 1);
    // Captured frames decode whole, in one stream, and fail cleanly when cut anywhere.
    let slapd: Vec<&Vec<u8>> = inputs
        .iter()
        .filter(|(name, _)| name.starts_with("slapd-"))
        .map(|(_, data)| data)
        .collect();
    let stream: Vec<u8> = slapd.iter().flat_map(|f| f.iter().copied()).collect();
    assert_eq!(decode_stream(&mut rng, &stream), Ok(slapd.len()));
    for frame in slapd.iter().filter(|f| f.len() < 4096) {
        for cut in 0..frame.len() {
            let prefix = &frame[..cut];
            match frame_len(prefix) {
                Ok(Some(len)) => assert!(len > cut),
                Ok(None) => {}
                Err(e) => panic!("prefix of {cut} bytes: {e}"),
            }
            assert!(parse_message(Bytes::copy_from_slice(prefix)).is_err());
        }
    }
    // Lengths past the limit or the data, indefinite lengths, deep nesting.
    let mut nested = Vec::new();
    for _ in 0..5_000 {
        nested = [
            &[0x30u8, 0x84][..],
            &(nested.len() as u32).to_be_bytes(),
            &nested,
        ]
        .concat();
    }
    let huge: &[&[u8]] = &[
        &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
        &[0x30, 0x88, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        &[0x30, 0x80, 0x02, 0x01, 0x01, 0x00, 0x00],
        &[
            0x30, 0x0a, 0x02, 0x01, 0x01, 0x64, 0x05, 0x04, 0x84, 0x7f, 0xff, 0xff, 0xff,
        ],
        &[0x30, 0x07, 0x02, 0x01, 0x01, 0x64, 0x02, 0x04, 0x85],
        &nested,
    ];
    for data in huge {
        assert!(
            decode_stream(&mut rng, data).is_err(),
            "{:?}",
            &data[..8.min(data.len())]
        );
    }

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut rounds, mut decoded) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..64 {
            rounds += 1;
            let (_, base) = &inputs[rng.below(inputs.len())];
            let (_, other) = &inputs[rng.below(inputs.len())];
            let mut data = base.clone();
            if rng.below(2) == 0 {
                // Wrong structure in a well-framed message.
                let Ok((_, mut tag)) = parse_tag(&data) else {
                    continue;
                };
                mutate_tree(&mut rng, &mut tag);
                let PL::C(mut parts) = tag.payload else {
                    continue;
                };
                if parts.len() < 2 {
                    continue;
                }
                data = envelope(parts.swap_remove(1));
            } else {
                mutate_bytes(&mut rng, &mut data, other);
            }
            // Followed by a good frame: an error must not be a panic, success must frame
            // the next message correctly.
            let good = slapd[rng.below(slapd.len())];
            let stream = [&data[..], &good[..]].concat();
            no_panic(seed, rounds, &stream, || {
                if decode_stream(&mut rng, &stream).is_ok() {
                    decoded += 1;
                }
            });
        }
    }
    eprintln!("{rounds} rounds, {decoded} decoded without error (seed {seed})");
    assert!(decoded > 100 && decoded < rounds, "{decoded} of {rounds}");
}
