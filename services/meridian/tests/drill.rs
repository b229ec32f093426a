//! CI's short drills (issue 11 item 5): `meridian drill <scenario>` of every scenario, each on
//! a two-region deployment the drill starts itself, must pass its invariants and write a
//! report whose faults all ended and recovered. One test runs them one after another: five
//! deployments at once would only measure the 2-core machine. The long versions are in
//! chaos/README.md.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn drill(out: &Path, scenario: &str, extra: &[&str]) -> Value {
    let status = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args([
            "drill",
            scenario,
            "--regions",
            "us,eu",
            "--duration",
            "20s",
            "--rate",
            "30",
        ])
        .args(["--converge-timeout", "90s", "--out"])
        .arg(out)
        .args(extra)
        .status()
        .expect("run meridian drill");
    let runs: Vec<_> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{scenario}-"))
        })
        .collect();
    assert_eq!(runs.len(), 1, "one run folder for {scenario}");
    let dir = runs[0].path();
    let report: Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    let svg = std::fs::read_to_string(dir.join("report.svg")).unwrap();
    assert!(svg.contains("<svg"), "report.svg is an SVG");
    assert!(
        status.success(),
        "meridian drill {scenario} failed ({status}); report: {report:#}"
    );
    assert_eq!(report["scenario"], scenario);
    assert_eq!(report["verdict"], "pass", "{report:#}");
    assert!(
        report["acked"].as_u64().unwrap() > 0,
        "the workload sent: {report:#}"
    );
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["digests_equal"], true);
    let faults = report["faults"].as_array().unwrap();
    assert!(!faults.is_empty(), "{scenario} put a fault in: {report:#}");
    for f in faults {
        assert!(f["end_ms"].as_u64().is_some(), "fault ended: {f}");
        assert!(f["recovery_s"].as_f64().is_some(), "fault recovered: {f}");
    }
    report
}

#[test]
fn short_drill_of_every_scenario_passes_its_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();

    let r = drill(out, "region-loss", &[]);
    let kinds: Vec<&str> = r["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["region-loss", "failover"], "{r:#}");

    let r = drill(out, "partition", &[]);
    assert_eq!(r["faults"][0]["target"], "eu");

    drill(
        out,
        "slow-link",
        &["--delay", "100ms", "--jitter", "20ms", "--loss", "0.02"],
    );

    let r = drill(out, "crash-soak", &["--crash-every", "3s", "--seed", "7"]);
    assert!(
        r["faults"].as_array().unwrap().len() >= 2,
        "several crashes in 20 s: {r:#}"
    );

    drill(out, "clock-skew", &["--skew-ms", "3000"]);
}
