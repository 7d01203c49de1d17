//! Handler call overhead of the Python host (issue goal: ≥ 100,000 calls/s including the
//! dict building for a 20-attribute entry).
//!
//! Measures `Module::handler` of a loaded module file — the host's lock, taking the GIL,
//! building `new`/`old` as `dict[str, list[bytes]]`, the call and its result — and, as the
//! reference in the same run, the same dict building and call made directly on a thread
//! that holds the GIL throughout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use modules::python::{HostOptions, PythonHost, PythonModule};
use modules::{Call, Command, Module};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

type Attrs = Vec<(String, Vec<Vec<u8>>)>;

const HANDLER: &str = "def handler(dn, new, old, command):\n    \
    if new.get('uid') and old.get('uid') != new.get('uid'):\n        pass\n";

/// A typical user object: 20 attributes, 23 values.
fn entry(variant: u8) -> Attrs {
    let mut attrs: Attrs = vec![
        (
            "objectClass".into(),
            vec![
                b"top".to_vec(),
                b"person".to_vec(),
                b"inetOrgPerson".to_vec(),
                b"posixAccount".to_vec(),
            ],
        ),
        ("uid".into(), vec![b"jdoe".to_vec()]),
        ("cn".into(), vec![b"John Doe".to_vec()]),
        ("sn".into(), vec![b"Doe".to_vec()]),
        ("givenName".into(), vec![b"John".to_vec()]),
        ("mail".into(), vec![b"john.doe@example.com".to_vec()]),
        ("uidNumber".into(), vec![b"2001".to_vec()]),
        ("gidNumber".into(), vec![b"5001".to_vec()]),
        ("homeDirectory".into(), vec![b"/home/jdoe".to_vec()]),
        ("loginShell".into(), vec![b"/bin/bash".to_vec()]),
        ("telephoneNumber".into(), vec![b"+49 421 22232 0".to_vec()]),
        ("description".into(), vec![vec![b'x'; 40]]),
        (
            "entryUUID".into(),
            vec![b"9a1f3c2e-7a2d-1041-9c49-a14ea7b318e1".to_vec()],
        ),
        (
            "entryCSN".into(),
            vec![format!("20261121120000.000000Z#000000#000#00000{variant}").into_bytes()],
        ),
        (
            "entryDN".into(),
            vec![b"uid=jdoe,cn=users,dc=example,dc=com".to_vec()],
        ),
        ("createTimestamp".into(), vec![b"20261121120000Z".to_vec()]),
        ("modifyTimestamp".into(), vec![b"20261121120000Z".to_vec()]),
        (
            "creatorsName".into(),
            vec![b"cn=admin,dc=example,dc=com".to_vec()],
        ),
        (
            "modifiersName".into(),
            vec![b"cn=admin,dc=example,dc=com".to_vec()],
        ),
        (
            "structuralObjectClass".into(),
            vec![b"inetOrgPerson".to_vec()],
        ),
    ];
    attrs.truncate(20);
    attrs
}

fn dict<'py>(py: Python<'py>, attrs: &Attrs) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, values) in attrs {
        dict.set_item(
            name,
            PyList::new(py, values.iter().map(|v| PyBytes::new(py, v)))?,
        )?;
    }
    Ok(dict)
}

fn main() {
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.py");
    std::fs::write(
        &path,
        format!("description = 'bench'\nmodrdn = '1'\n{HANDLER}"),
    )
    .unwrap();
    let host = PythonHost::start(HostOptions {
        // SAFETY: geteuid cannot fail.
        daemon_uid: unsafe { libc::geteuid() },
        ucr_file: None,
    })
    .unwrap();
    let mut module = PythonModule::load(&host, &path).unwrap();
    let (new, old) = (entry(1), entry(0));
    println!("Python handler calls, 20-attribute entry (new and old), {calls} calls per round");

    let mut best_host = 0.0f64;
    let mut best_direct = 0.0f64;
    for round in 1..=3 {
        let mut rate_via_host = |command, new: &Attrs, old: &Attrs| {
            let start = Instant::now();
            for _ in 0..calls {
                let call = Call {
                    id: 1,
                    dn: "uid=jdoe,cn=users,dc=example,dc=com",
                    command,
                    new,
                    old,
                    transaction: 1,
                    number: 1,
                };
                module.handler(&call).unwrap();
            }
            calls as f64 / start.elapsed().as_secs_f64()
        };
        let host_rate = rate_via_host(Command::Modify, &new, &old);
        let bare_rate = rate_via_host(Command::Delete, &Vec::new(), &Vec::new());

        // Reference: the same work with the GIL held throughout, no host around it.
        let direct_rate = Python::attach(|py| -> PyResult<f64> {
            let globals = PyDict::new(py);
            py.run(
                &std::ffi::CString::new(HANDLER).unwrap(),
                Some(&globals),
                None,
            )?;
            let handler = globals.get_item("handler")?.unwrap();
            let start = Instant::now();
            for _ in 0..calls {
                let result = handler.call1((
                    "uid=jdoe,cn=users,dc=example,dc=com",
                    dict(py, &new)?,
                    dict(py, &old)?,
                    "m",
                ))?;
                assert!(result.is_none());
            }
            Ok(calls as f64 / start.elapsed().as_secs_f64())
        })
        .unwrap();
        println!(
            "  round {round}: via the host {host_rate:>9.0} calls/s   direct {direct_rate:>9.0} calls/s   \
             (via the host with empty new/old: {bare_rate:.0} calls/s)"
        );
        best_host = best_host.max(host_rate);
        best_direct = best_direct.max(direct_rate);
    }
    println!(
        "  best: via the host {best_host:.0} calls/s (goal >= 100000), direct {best_direct:.0} calls/s"
    );
    println!(
        "  host / goal {:.2}   host / direct {:.2}",
        best_host / 100_000.0,
        best_direct.recip() * best_host
    );
}
