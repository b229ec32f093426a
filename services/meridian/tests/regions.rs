//! Every file in regions/ loads, validates, and together they make one deployment: each
//! region mirrors exactly the others and knows every region's endpoint. A region added as a
//! file but missing from another file's `mirrors` fails here, naming that file's region.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _, Result};
use meridian::config::{validate_region_set, RegionConfig};

fn region_files() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../regions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    Ok(files)
}

/// The secrets the files leave as placeholders, set the way an operator sets them.
fn secrets() -> Vec<(String, String)> {
    vec![
        (
            "MERIDIAN__GATEWAY__JWT_SECRET".into(),
            "0123456789abcdef0123456789abcdef".into(),
        ),
        (
            "MERIDIAN__GATEWAY__ADMIN_KEY".into(),
            "regions-test-admin-key".into(),
        ),
    ]
}

#[test]
fn item1_every_region_file_loads_and_the_set_is_one_deployment() -> Result<()> {
    let files = region_files()?;
    ensure!(files.len() >= 3, "us, eu and ap at least: {files:?}");
    let mut configs = Vec::new();
    for file in &files {
        let cfg = RegionConfig::load(file, secrets()).with_context(|| file.display().to_string())?;
        let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        ensure!(
            cfg.region.as_str() == stem,
            "{} names region {}",
            file.display(),
            cfg.region
        );
        configs.push(cfg);
    }
    validate_region_set(&configs)?;
    Ok(())
}

#[test]
fn item1_a_region_missing_from_a_mirror_list_is_named() -> Result<()> {
    let mut configs = Vec::new();
    for file in region_files()? {
        configs.push(RegionConfig::load(&file, secrets())?);
    }
    let forgetful = configs
        .iter()
        .position(|c| c.region.as_str() == "eu")
        .context("regions/eu.toml")?;
    configs[forgetful].bus.mirrors.retain(|r| r.as_str() != "ap");
    let err = validate_region_set(&configs)
        .expect_err("eu no longer mirrors ap")
        .to_string();
    ensure!(err.contains("bus.mirrors") && err.contains("region eu"), "{err}");

    configs[forgetful].bus.mirrors = configs
        .iter()
        .map(|c| c.region.clone())
        .filter(|r| r.as_str() != "eu")
        .collect();
    configs[forgetful].gateway.region_endpoints.remove("us");
    let err = validate_region_set(&configs)
        .expect_err("eu has no endpoint for us")
        .to_string();
    ensure!(err.contains("region_endpoints") && err.contains("us"), "{err}");
    Ok(())
}
