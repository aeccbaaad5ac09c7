//! The README's TLS quick start, run as the README gives it: `amphora certs init`,
//! `amphora certs client`, `amphora serve` with TLS, curl with and without the client
//! certificate. Only two things are substituted: the built binary for
//! `cargo run -q --release --`, and a free port for 8443.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn quickstart_script() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find("<!-- tls-quickstart -->")
        .expect("README has the quick start marker");
    let end = readme
        .find("<!-- /tls-quickstart -->")
        .expect("README has the end marker");
    let block = &readme[start..end];
    let body_start = block.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let body_end = block.rfind("```").unwrap();
    block[body_start..body_end].to_owned()
}

/// True when the process has exited (is a zombie), without reaping it.
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn readme_tls_quick_start_works_as_written() {
    let script = quickstart_script();
    let original = r#"AMPHORA="cargo run -q --release --""#;
    assert!(
        script.contains(original),
        "the quick start defines AMPHORA as {original}"
    );
    let script = script
        .replace(
            original,
            &format!("AMPHORA={}", env!("CARGO_BIN_EXE_amphora")),
        )
        .replace("8443", &free_port().to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("bash")
        .args(["-c", &format!("set -u\n{script}")])
        .current_dir(dir.path())
        .env("AMPHORA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = loop {
        if exited(child.id()) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The script is not reaped yet, so its process group id cannot have been reused:
    // this kills only what is left of the script (its background server, if any).
    // Not the `kill` program: procps-ng 4.0.2's `kill -KILL -PGID` calls kill(-1),
    // which kills every process on the machine.
    let group =
        rustix::process::Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    let status = child.wait().expect("reap the script");
    let status = finished.then_some(status);
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = status.unwrap_or_else(|| {
        panic!("the quick start did not finish\nstdout:\n{out}\nstderr:\n{err}")
    });
    assert!(
        status.success(),
        "{status:?}\nstdout:\n{out}\nstderr:\n{err}"
    );

    let lines: Vec<&str> = out.lines().collect();
    let expect = |needle: &str| {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no line with {needle:?} in:\n{out}\nstderr:\n{err}"
        );
    };
    expect(r#"{"created":true,"revision":1}"#);
    expect(r#""code":"client_certificate_required""#);
    expect(r#""value":{"ip": "10.0.0.1"}"#);
    expect(r#"{"created":false,"revision":2}"#);
    expect(r#""Success":"Scope written""#);
    expect(r#""value":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample n1""#);

    // Private keys are written with mode 0600, certificates readable.
    for (file, mode) in [
        ("ca.key", 0o600),
        ("server.key", 0o600),
        ("alice.key", 0o600),
        ("alice.pem", 0o644),
    ] {
        let m = std::fs::metadata(dir.path().join("certs").join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{file}");
    }
    // A second init refuses to overwrite anything.
    let again = Command::new(env!("CARGO_BIN_EXE_amphora"))
        .args(["certs", "init", "certs", "--server-name", "localhost"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not overwriting"));
}
