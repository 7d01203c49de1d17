//! `univention-directory-demo`: the whole replication chain on one machine, for a first
//! look at what the project does.
//!
//! It starts a private slapd, a notifier following slapd's `cn=accesslog` and a listener
//! with the native `jsonl` module and the Python example module `user_journal` (the
//! object-oriented UCS API), makes a few typical changes with the real ldap-utils tools and
//! prints every handler call and journal line as it arrives. With
//! `--once` it exits after the last expected call (0) or on a missing one (1); otherwise it
//! keeps running for the user's own changes until Ctrl-C. `scripts/demo.sh` builds and
//! runs it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use integration_tests::listener::{HANDLER_READY, JSONL_MODULE, tail};
use integration_tests::slapd::{ADMIN_DN, ADMIN_PW, BASE, HOST_DN};
use integration_tests::{
    Change, Intake, JsonlTail, Listener, ListenerOptions, Notifier, Process, Slapd, process,
};

/// How long each stage may take; far more than a healthy stack needs (well under a second
/// per change), so a timeout means something is broken rather than slow.
const WAIT: Duration = Duration::from_secs(60);
/// How often the jsonl file and the processes are looked at while waiting.
const POLL: Duration = Duration::from_millis(50);
/// Quiet time after handler calls before the interactive mode prints the ids again.
const SETTLE: Duration = Duration::from_secs(1);
/// The Python module the demo runs next to `jsonl`: the object-oriented API example.
const PYTHON_MODULE: &str = "user_journal";
const PYTHON_SOURCE: &str = include_str!("../../../modules/examples/user_journal.py");

/// Log lines shown when something fails.
const LOG_TAIL_LINES: usize = 40;
/// Longest value shown in a handler call line.
const MAX_VALUE_CHARS: usize = 40;

/// Attributes slapd maintains itself; leaving them out keeps the change lines readable.
const OPERATIONAL: &[&str] = &[
    "auditContext",
    "contextCSN",
    "createTimestamp",
    "creatorsName",
    "entryCSN",
    "entryDN",
    "entryUUID",
    "hasSubordinates",
    "modifiersName",
    "modifyTimestamp",
    "structuralObjectClass",
    "subschemaSubentry",
];

/// Set by SIGINT/SIGTERM; every wait loop looks at it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

/// Ctrl-C (or SIGTERM) arrived: not a failure, but the end of the run.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Interrupted.into());
    }
    Ok(())
}

const USAGE: &str = "usage: univention-directory-demo [--once]

Starts a private slapd, a notifier and a listener with the jsonl module, applies sample
changes with ldapadd/ldapmodify/ldapmodrdn and prints the listener's handler calls.

  --once   exit 0 once every expected handler call arrived (1 if one does not);
           without it the stack keeps running for your own changes until Ctrl-C";

fn main() -> ExitCode {
    let mut once = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--once" => once = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    install_interrupt_handler();
    // Ctrl-C must reach only the demo, which then stops the daemons in order; in the
    // terminal's process group they would all get it at once.
    process::use_own_process_groups(true);
    match run(once) {
        Ok(code) => code,
        Err(err) if err.is::<Interrupted>() => ExitCode::from(130),
        Err(err) => {
            eprintln!("\nFAILED: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(once: bool) -> Result<ExitCode> {
    println!("Univention Directory Listener demo");
    println!("==================================");
    println!("LDAP changes flow: slapd (cn=accesslog) -> notifier (numbered transactions)");
    println!(
        "-> listener (reads each changed entry, calls its modules) -> jsonl + a Python module."
    );
    println!();
    let mut demo = Demo::start()?;
    let outcome = demo.script(once);
    let code = match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<Interrupted>() => {
            println!("\nInterrupted.");
            if once {
                ExitCode::from(130)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("\nFAILED: {err:#}");
            demo.print_logs();
            ExitCode::FAILURE
        }
    };
    let logs_shown = code == ExitCode::FAILURE;
    let clean = demo.shutdown(logs_shown);
    if once && code == ExitCode::SUCCESS && !clean {
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

/// One change made with an ldap-utils tool, and the handler calls it must cause.
struct Step {
    tool: &'static str,
    title: &'static str,
    /// Arguments after the connection options.
    args: Vec<String>,
    /// LDIF for standard input.
    ldif: Option<String>,
    /// `(command, dn)` of the expected handler calls, in order.
    expect: Vec<(char, String)>,
}

fn dn(rdn: &str, parent: &str) -> String {
    format!("{rdn},{parent}")
}

fn steps() -> Vec<Step> {
    let people = dn("ou=people", BASE);
    let groups = dn("ou=groups", BASE);
    let alumni = dn("ou=alumni", BASE);
    let alice = dn("uid=alice", &people);
    let juergen = dn("cn=Jürgen Groß", &people);
    let group = dn("cn=demo", &groups);
    let alicia = dn("uid=alicia", &people);
    let alicia_moved = dn("uid=alicia", &alumni);
    vec![
        Step {
            tool: "ldapadd",
            title: "three organisational units: people, groups and alumni",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {people}\nobjectClass: organizationalUnit\nou: people\n\n\
                 dn: {groups}\nobjectClass: organizationalUnit\nou: groups\n\n\
                 dn: {alumni}\nobjectClass: organizationalUnit\nou: alumni\n"
            )),
            expect: vec![
                ('a', people.clone()),
                ('a', groups.clone()),
                ('a', alumni.clone()),
            ],
        },
        Step {
            tool: "ldapadd",
            title: "a user, alice",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {alice}\nobjectClass: inetOrgPerson\nuid: alice\ncn: Alice Liddell\n\
                 givenName: Alice\nsn: Liddell\nmail: alice@example.com\n"
            )),
            expect: vec![('a', alice.clone())],
        },
        Step {
            tool: "ldapadd",
            title: "a user with a non-ASCII name",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {juergen}\nobjectClass: inetOrgPerson\nuid: juergen\ncn: Jürgen Groß\n\
                 givenName: Jürgen\nsn: Groß\nmail: juergen@example.com\n"
            )),
            expect: vec![('a', juergen.clone())],
        },
        Step {
            tool: "ldapadd",
            title: "a group with both users",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {group}\nobjectClass: groupOfNames\ncn: demo\n\
                 description: Demo users\nmember: {alice}\nmember: {juergen}\n"
            )),
            expect: vec![('a', group.clone())],
        },
        Step {
            tool: "ldapmodify",
            title: "change alice's mail address",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {alice}\nchangetype: modify\nreplace: mail\nmail: alice.liddell@example.com\n"
            )),
            expect: vec![('m', alice.clone())],
        },
        Step {
            tool: "ldapmodify",
            title: "add a second mail address and a phone number to alice",
            args: Vec::new(),
            ldif: Some(format!(
                "dn: {alice}\nchangetype: modify\nadd: mail\nmail: alice@wonderland.example\n-\n\
                 add: telephoneNumber\ntelephoneNumber: +49 421 22232 0\n"
            )),
            expect: vec![('m', alice.clone())],
        },
        Step {
            tool: "ldapmodrdn",
            title: "rename alice to alicia (a rename is r for the old DN, then a for the new one)",
            args: vec!["-r".into(), alice.clone(), "uid=alicia".into()],
            ldif: None,
            expect: vec![('r', alice.clone()), ('a', alicia.clone())],
        },
        Step {
            tool: "ldapmodrdn",
            title: "move alicia to ou=alumni (a move is r + a too)",
            args: vec![
                "-r".into(),
                "-s".into(),
                alumni.clone(),
                alicia.clone(),
                "uid=alicia".into(),
            ],
            ldif: None,
            expect: vec![('r', alicia.clone()), ('a', alicia_moved.clone())],
        },
        Step {
            tool: "ldapmodify",
            title: "delete alicia",
            args: Vec::new(),
            ldif: Some(format!("dn: {alicia_moved}\nchangetype: delete\n")),
            expect: vec![('d', alicia_moved)],
        },
    ]
}

/// The running stack and what the listener reported so far.
struct Demo {
    slapd: Slapd,
    notifier: Notifier,
    listener: Listener,
    tail: JsonlTail,
    /// Every handler call read from the jsonl file.
    seen: Vec<Change>,
    /// Expected calls are searched for from here on: everything before was matched
    /// already or belongs to the initial sync.
    cursor: usize,
    /// The `-m` directory with the Python module, and its journal file.
    _modules: tempfile::TempDir,
    journal: LineTail,
}

/// Complete lines appended to a file since the last look.
struct LineTail {
    path: std::path::PathBuf,
    offset: usize,
    lines: Vec<String>,
}

impl LineTail {
    fn poll(&mut self) -> Vec<String> {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        let Some(rest) = bytes.get(self.offset..) else {
            return Vec::new();
        };
        let Some(end) = rest.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        self.offset += end + 1;
        let lines: Vec<String> = String::from_utf8_lossy(&rest[..end])
            .lines()
            .map(str::to_owned)
            .collect();
        self.lines.extend(lines.iter().cloned());
        lines
    }
}

impl Demo {
    fn start() -> Result<Demo> {
        println!("Starting a private slapd …");
        let slapd = Slapd::provider().context("starting slapd")?;
        println!("  slapd     {}", slapd.ldap_url());
        println!("            base {BASE}, admin {ADMIN_DN} (password {ADMIN_PW})");
        println!("            directory {}", slapd.dir().display());
        check_interrupted()?;

        println!("Starting the notifier …");
        let notifier =
            Notifier::start(&slapd, Intake::Accesslog, &[]).context("starting the notifier")?;
        // The notifier's first start begins after the newest accesslog entry; only once that
        // position is stored do later writes count as new transactions.
        let position = notifier.ldap_dir().join("notify/accesslog.position");
        wait_simple("the notifier's accesslog position", || position.exists())?;
        println!(
            "  notifier  127.0.0.1:{} (listener protocol 3), following slapd's cn=accesslog",
            notifier.port()
        );
        println!(
            "            log {}",
            notifier.dir().join("notifier.log").display()
        );
        check_interrupted()?;

        println!("Starting the listener …");
        let modules = tempfile::tempdir().context("creating the module directory")?;
        let module_file = modules.path().join(format!("{PYTHON_MODULE}.py"));
        std::fs::write(&module_file, PYTHON_SOURCE).context("writing the Python module")?;
        let journal = modules.path().join(format!("{PYTHON_MODULE}.log"));
        let options = ListenerOptions::new()
            .module_dir(modules.path())
            .ucr(format!(
                "ldap/base: {BASE}\nlistener/module/{PYTHON_MODULE}/file: {}\n",
                journal.display()
            ));
        let listener =
            Listener::start(&slapd, &notifier, options).context("starting the listener")?;
        println!("  listener  bound to slapd as {HOST_DN}");
        println!("            cache dir {}", listener.cache_dir().display());
        println!(
            "            handler calls (jsonl module) {}",
            listener.jsonl_path().display()
        );
        println!(
            "            Python module {} (journal {})",
            module_file.display(),
            journal.display()
        );
        println!("            log {}", listener.log_path().display());
        println!();
        println!("Handler call lines read: [id <transaction>] <module> <command> <dn>  (details)");
        println!("  then the Python module's journal lines: python user_journal: <line>");
        println!("  commands: a add, m modify, d delete, r renamed or moved away");
        println!(
            "  (+attr: added, -attr: removed, attr: old → new; operational attributes left out)"
        );
        println!();
        let tail = listener.tail();
        Ok(Demo {
            slapd,
            notifier,
            listener,
            tail,
            seen: Vec::new(),
            cursor: 0,
            _modules: modules,
            journal: LineTail {
                path: journal,
                offset: 0,
                lines: Vec::new(),
            },
        })
    }

    fn script(&mut self, once: bool) -> Result<()> {
        println!(
            "==> Waiting for the listener's initial sync (a handler call for every visible entry) …"
        );
        self.wait_for("the listener's initial sync", |demo| {
            let ready = [JSONL_MODULE, PYTHON_MODULE]
                .iter()
                .all(|module| demo.listener.handler_state(module) == Some(HANDLER_READY));
            Ok(demo.listener.notifier_id().filter(|_| ready))
        })?;
        self.cursor = self.seen.len();
        println!(
            "    initial sync done, listener at transaction {}",
            self.listener.notifier_id().unwrap_or(0)
        );
        println!();

        let url = self.slapd.ldap_url();
        let steps = steps();
        let expected: usize = steps.iter().map(|step| step.expect.len()).sum();
        for step in &steps {
            self.apply(step, &url)?;
        }
        // The journal line of the last step is written in the same transaction as its
        // jsonl call; the listener's id moves only after every module ran.
        let last = self.seen.last().map_or(0, |change| change.id);
        self.wait_for("the Python module's journal", |demo| {
            Ok(demo.listener.notifier_id().filter(|&id| id >= last))
        })?;
        self.pump()?;
        if !self
            .journal
            .lines
            .iter()
            .any(|line| line.starts_with("removed alicia"))
        {
            bail!(
                "the Python module {PYTHON_MODULE} did not journal the last change; its lines: {:?}",
                self.journal.lines
            );
        }
        println!("All {expected} expected handler calls arrived.");
        println!();
        self.print_status();
        if once {
            return Ok(());
        }
        self.interactive(&url)
    }

    /// Runs one step's tool and waits for its handler calls.
    fn apply(&mut self, step: &Step, url: &str) -> Result<()> {
        check_interrupted()?;
        println!("==> {}: {}", step.tool, step.title);
        let mut args: Vec<String> = vec![
            "-x".into(),
            "-H".into(),
            url.into(),
            "-D".into(),
            ADMIN_DN.into(),
            "-w".into(),
            ADMIN_PW.into(),
        ];
        args.extend(step.args.iter().cloned());
        let shown: Vec<String> = args.iter().map(|arg| shell_quote(arg)).collect();
        match &step.ldif {
            Some(ldif) => {
                println!("    $ {} {} <<'EOF'", step.tool, shown.join(" "));
                for line in ldif.lines() {
                    if line.is_empty() {
                        println!();
                    } else {
                        println!("    {line}");
                    }
                }
                println!("    EOF");
            }
            None => println!("    $ {} {}", step.tool, shown.join(" ")),
        }
        run_tool(step.tool, &args, step.ldif.as_deref())?;
        let what = format!("the handler calls for \"{}\"", step.title);
        let expect = &step.expect;
        let cursor = self.wait_for(&what, |demo| {
            Ok(find_expected(&demo.seen, demo.cursor, expect))
        })?;
        self.cursor = cursor;
        println!();
        Ok(())
    }

    /// Prints handler calls as they arrive until Ctrl-C.
    fn interactive(&mut self, url: &str) -> Result<()> {
        let connect = format!("-x -H {url} -D {ADMIN_DN} -w {ADMIN_PW}");
        println!("The stack keeps running. Make changes of your own from another terminal, e.g.:");
        println!();
        println!("  ldapmodify {connect} <<'EOF'");
        println!("  dn: cn=demo,ou=groups,{BASE}");
        println!("  changetype: modify");
        println!("  replace: description");
        println!("  description: changed by hand");
        println!("  EOF");
        println!();
        println!("  (ldapadd, ldapdelete and ldapmodrdn take the same options)");
        println!();
        println!("Handler calls appear below as they arrive. Press Ctrl-C to stop everything");
        println!("and remove the temporary directories.");
        println!();
        let mut last_call: Option<Instant> = None;
        loop {
            check_interrupted()?;
            if self.pump()? > 0 {
                last_call = Some(Instant::now());
            }
            if last_call.is_some_and(|at| at.elapsed() >= SETTLE) {
                last_call = None;
                let listener = self
                    .listener
                    .notifier_id()
                    .map_or_else(|| "?".to_owned(), |id| id.to_string());
                let notifier = self
                    .notifier_id()
                    .map_or_else(|err| format!("? ({err})"), |id| id.to_string());
                println!("    listener at transaction {listener}, notifier at {notifier}");
            }
            self.check_listener_alive("new changes")?;
            std::thread::sleep(POLL);
        }
    }

    /// Reads and prints the handler calls completed since the last call; returns how many.
    fn pump(&mut self) -> Result<usize> {
        let changes = self.tail.poll().context("reading the jsonl file")?;
        for change in &changes {
            println!("{}", describe(change));
        }
        let count = changes.len();
        self.seen.extend(changes);
        for line in self.journal.poll() {
            println!("    python {PYTHON_MODULE}: {line}");
        }
        Ok(count)
    }

    fn check_listener_alive(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.listener.process().and_then(Process::try_status) {
            bail!("the listener exited with {status} while waiting for {what}");
        }
        Ok(())
    }

    /// Polls `check` (printing handler calls meanwhile) until it yields a value, the
    /// listener exits, the user interrupts or [`WAIT`] passes.
    fn wait_for<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&mut Demo) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + WAIT;
        loop {
            self.pump()?;
            if let Some(value) = check(self)? {
                return Ok(value);
            }
            check_interrupted()?;
            self.check_listener_alive(what)?;
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {}s waiting for {what} (listener at transaction {}, notifier at {})",
                    WAIT.as_secs(),
                    self.listener
                        .notifier_id()
                        .map_or_else(|| "none".to_owned(), |id| id.to_string()),
                    self.notifier_id()
                        .map_or_else(|err| format!("unknown: {err}"), |id| id.to_string()),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The notifier's newest transaction, asked over the listener protocol.
    fn notifier_id(&self) -> Result<u64> {
        Ok(self.notifier.last_id()?)
    }

    fn print_status(&self) {
        let listener = self.listener.notifier_id();
        let notifier = self.notifier_id();
        println!("Listener status");
        match &notifier {
            Ok(id) => println!("  notifier's newest transaction     {id}  (GET_ID)"),
            Err(err) => println!("  notifier's newest transaction     unknown: {err:#}"),
        }
        match listener {
            Some(id) => println!("  listener's last processed one     {id}  (cache/notifier_id)"),
            None => println!("  listener's last processed one     none yet"),
        }
        if let (Ok(notifier), Some(listener)) = (&notifier, listener) {
            println!(
                "  lag                               {} transactions",
                notifier.saturating_sub(listener)
            );
        }
        let states = self.listener.handler_states();
        if states.is_empty() {
            println!("  module states (cache/handlers/)   none");
        }
        for (module, state) in states {
            let meaning = if state == HANDLER_READY {
                "ready"
            } else {
                "not initialised"
            };
            println!("  module state (cache/handlers/)    {module} = {state} ({meaning})");
        }
        println!(
            "  cache dir                         {}",
            self.listener.cache_dir().display()
        );
        println!();
    }

    fn print_logs(&self) {
        eprintln!(
            "--- listener log ({}), last {LOG_TAIL_LINES} lines ---\n{}",
            self.listener.log_path().display(),
            self.listener.log_tail(LOG_TAIL_LINES)
        );
        eprintln!(
            "--- notifier log, last {LOG_TAIL_LINES} lines ---\n{}",
            tail(&self.notifier.log(), LOG_TAIL_LINES)
        );
    }

    /// Stops listener, notifier and slapd in that order; their temporary directories go
    /// when they are dropped. False when the listener did not exit cleanly; its log is
    /// shown then unless `logs_shown` says a failure already showed it.
    fn shutdown(mut self, logs_shown: bool) -> bool {
        println!("Stopping the listener (SIGTERM; it runs postrun first) …");
        let clean = match self.listener.stop() {
            Ok(status) if status.success() => {
                println!("  listener exited with {status}");
                true
            }
            Ok(status) => {
                eprintln!("  listener exited with {status}");
                if !logs_shown {
                    self.print_logs();
                }
                false
            }
            Err(err) => {
                eprintln!("  stopping the listener: {err}");
                false
            }
        };
        println!("Stopping the notifier and slapd …");
        if let Err(err) = self.notifier.stop() {
            eprintln!("  stopping the notifier: {err}");
        }
        if let Err(err) = self.slapd.stop(Duration::from_secs(10)) {
            eprintln!("  stopping slapd: {err}");
        }
        drop(self);
        println!("Stopped; temporary directories removed.");
        clean
    }
}

/// Waits for a condition before the listener runs (no handler calls to print yet).
fn wait_simple(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !check() {
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!("timed out after {}s waiting for {what}", WAIT.as_secs());
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Runs an ldap-utils tool with `stdin`; fails with its output if it does.
fn run_tool(tool: &str, args: &[String], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool} (apt-get install ldap-utils)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing LDIF to {tool}"))?;
        // Dropping the pipe closes it: the tool reads LDIF until end of input.
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {tool}"))?;
    if !output.status.success() {
        bail!(
            "{tool} failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Quotes `arg` for a POSIX shell when it needs it, so printed commands can be pasted.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=,.@_:/+-".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Index after the last of `expect` found in order in `seen[from..]`, if all are there.
fn find_expected(seen: &[Change], from: usize, expect: &[(char, String)]) -> Option<usize> {
    let mut at = from;
    for (command, dn) in expect {
        let found = seen.get(at..)?.iter().position(|change| {
            change.module == JSONL_MODULE && change.command == *command && same_dn(&change.dn, dn)
        })?;
        at += found + 1;
    }
    Some(at)
}

/// DN equality good enough for the demo's own DNs: case, spaces around `,`/`=` and
/// `\XX` hex escapes do not matter (the listener may report a DN as slapd normalised it).
fn same_dn(a: &str, b: &str) -> bool {
    dn_key(a) == dn_key(b)
}

fn dn_key(dn: &str) -> String {
    let bytes = dn.as_bytes();
    let mut raw = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok());
            if let Some(byte) = hex {
                raw.push(byte);
                i += 3;
                continue;
            }
        }
        raw.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&raw)
        .split(',')
        .map(|rdn| {
            rdn.split('=')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("=")
                .to_lowercase()
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `[id 7] jsonl a uid=alice,…  (+cn, +mail, …)`: one handler call on one line.
fn describe(change: &Change) -> String {
    let mut line = format!(
        "[id {}] {} {} {}",
        change.id, change.module, change.command, change.dn
    );
    let details = match change.command {
        'r' | 'd' => String::new(),
        'm' => modified(change),
        _ => change
            .new
            .keys()
            .filter(|attr| !is_operational(attr))
            .map(|attr| format!("+{attr}"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    if !details.is_empty() {
        let _ = write!(line, "  ({details})");
    }
    line
}

fn modified(change: &Change) -> String {
    let changed = change.changed_attributes();
    let parts: Vec<String> = changed
        .iter()
        .filter(|attr| !is_operational(attr))
        .map(|attr| match (change.old.get(attr), change.new.get(attr)) {
            (None, Some(new)) => format!("+{attr}: {}", show_values(new)),
            (Some(old), None) => format!("-{attr}: {}", show_values(old)),
            (Some(old), Some(new)) => {
                format!("{attr}: {} → {}", show_values(old), show_values(new))
            }
            (None, None) => attr.clone(),
        })
        .collect();
    if parts.is_empty() && !changed.is_empty() {
        return "operational attributes only".to_owned();
    }
    parts.join(", ")
}

fn is_operational(attr: &str) -> bool {
    OPERATIONAL.iter().any(|op| op.eq_ignore_ascii_case(attr))
}

fn show_values(values: &[Vec<u8>]) -> String {
    match values {
        [one] => show_value(one),
        many => format!(
            "[{}]",
            many.iter()
                .map(|value| show_value(value))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn show_value(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(text) if text.chars().count() > MAX_VALUE_CHARS => {
            let cut: String = text.chars().take(MAX_VALUE_CHARS).collect();
            format!("{cut}…")
        }
        Ok(text) => text.to_owned(),
        Err(_) => format!("<{} bytes>", value.len()),
    }
}
