//! CI's bench smoke: `meridian bench --smoke` starts its own one-region deployment, runs every
//! workload at tiny sizes, and must deliver everything exactly once. (Speed is not asserted
//! here: figures come from full runs, in docs/benchmarks.md.)

use std::process::Command;

#[test]
fn bench_smoke_runs_every_workload_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let status = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--smoke", "--out"])
        .arg(&out)
        .current_dir(dir.path())
        .status()
        .expect("run meridian bench");
    assert!(status.success(), "meridian bench --smoke failed: {status}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let steps = report["steps"].as_array().unwrap();
    let workloads: Vec<&str> = steps.iter().map(|s| s["workload"].as_str().unwrap()).collect();
    for w in ["W1", "W2", "W3", "W4"] {
        assert!(workloads.contains(&w), "{w} missing from {workloads:?}");
    }
    for s in steps {
        assert_eq!(s["undelivered"], 0, "{s}");
        assert_eq!(s["duplicates"], 0, "{s}");
        assert!(s["delivered"].as_u64().unwrap() > 0, "{s}");
    }
    let w1 = steps.iter().find(|s| s["workload"] == "W1").unwrap();
    assert!(
        w1["p99_ms"].as_f64().unwrap() > 0.0,
        "latencies were measured: {w1}"
    );
}

/// X1 on its own two-region deployment (us and eu, linked): every message sent in us reaches
/// its receiver's socket in eu exactly once, with latencies and the mirror lag of SYNC_US in
/// eu measured.
#[test]
fn bench_smoke_cross_region_delivers_everything_once_and_reports_mirror_lag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let status = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["bench", "--smoke", "--workloads", "x1", "--out"])
        .arg(&out)
        .current_dir(dir.path())
        .status()
        .expect("run meridian bench");
    assert!(
        status.success(),
        "meridian bench --smoke --workloads x1 failed: {status}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1, "{report}");
    let x1 = &steps[0];
    assert_eq!(x1["workload"], "X1", "{x1}");
    assert_eq!(x1["undelivered"], 0, "{x1}");
    assert_eq!(x1["duplicates"], 0, "{x1}");
    assert!(x1["delivered"].as_u64().unwrap() > 0, "{x1}");
    assert!(
        x1["p999_ms"].as_f64().unwrap() >= x1["p99_ms"].as_f64().unwrap(),
        "{x1}"
    );
    assert!(x1["p99_ms"].as_f64().unwrap() > 0.0, "{x1}");
    assert!(
        x1["mirror_lag"]["samples"].as_u64().unwrap_or(0) > 0,
        "the mirror lag of us's stream in eu was sampled: {x1}"
    );
}
