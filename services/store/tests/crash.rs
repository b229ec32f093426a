//! Crash safety of the embedded backend: a child process commits in a loop and reports each
//! acknowledged commit on stdout; the parent kills it with SIGKILL mid-stream, reopens the
//! directory, and checks that every acknowledged commit is there and no commit is partial.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_store::kv::embedded::{EmbeddedStore, EngineKind};
use meridian_store::kv::prefix_end;
use meridian_store::{KvStore, ScanOrder};

const CHILD_DIR: &str = "MERIDIAN_CRASH_CHILD_DIR";
const CHILD_ENGINE: &str = "MERIDIAN_CRASH_CHILD_ENGINE";
/// Each commit writes this many keys; a partial commit would leave fewer.
const KEYS_PER_COMMIT: usize = 8;

fn engine(name: &str) -> EngineKind {
    if name == "redb" {
        EngineKind::Redb
    } else {
        EngineKind::Fjall
    }
}

/// The child: run only when the parent starts this binary with the env vars set.
#[tokio::test]
#[ignore = "run by crash_keeps_every_acknowledged_commit as a child process"]
async fn crash_child() {
    let dir = std::env::var(CHILD_DIR).expect("child needs its directory");
    let kv = EmbeddedStore::open(&dir, engine(&std::env::var(CHILD_ENGINE).unwrap())).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let mut t = kv.begin().await.unwrap();
        for j in 0..KEYS_PER_COMMIT {
            t.put(format!("c/{i:010}/{j}").into_bytes(), vec![j as u8; 100])
                .await
                .unwrap();
        }
        t.commit().await.unwrap();
        writeln!(out, "ack {i}").unwrap();
        out.flush().unwrap();
    }
}

fn run(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .env(CHILD_ENGINE, kind)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: Option<u64> = None;
    let start = Instant::now();
    // Let it get well into its stride, then kill it wherever it is.
    while acked.is_none_or(|a| a < 300) && start.elapsed() < Duration::from_secs(60) {
        let Some(Ok(line)) = lines.next() else { break };
        if let Some(n) = line.strip_prefix("ack ") {
            acked = Some(n.parse().unwrap());
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    let acked = acked.expect("the child acknowledged commits before it was killed");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let kv = EmbeddedStore::open(dir.path(), engine(kind)).unwrap();
        let mut r = kv.begin_read().await.unwrap();
        let rows = r
            .scan(b"c/", &prefix_end(b"c/"), usize::MAX, ScanOrder::Forward)
            .await
            .unwrap();
        let mut per_commit = std::collections::BTreeMap::<u64, usize>::new();
        for (k, _) in rows {
            let s = String::from_utf8(k).unwrap();
            let i: u64 = s[2..12].parse().unwrap();
            *per_commit.entry(i).or_default() += 1;
        }
        for i in 0..=acked {
            assert_eq!(
                per_commit.get(&i),
                Some(&KEYS_PER_COMMIT),
                "{kind}: acknowledged commit {i} lost or partial"
            );
        }
        for (i, n) in per_commit {
            assert_eq!(n, KEYS_PER_COMMIT, "{kind}: commit {i} is partial");
        }
    });
}

#[test]
fn crash_keeps_every_acknowledged_commit_fjall() {
    run("fjall");
}

#[test]
fn crash_keeps_every_acknowledged_commit_redb() {
    run("redb");
}
