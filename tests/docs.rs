//! The repository carries its own design and contract (issue 8 item 11): docs/design.md and
//! docs/api.md exist, the API document names every route the server serves and every error
//! code the gateway answers with, and nothing in the tree points at documents outside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use meridian_gateway::GatewayConfig;
use meridian_model::RegionId;
use regex::Regex;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every file under `dir` with one of `exts`, skipping build output and installed tools.
fn files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if !matches!(name, "target" | ".git" | ".tools" | ".data") {
                files(&path, exts, out)?;
            }
        } else if exts.iter().any(|e| name.ends_with(e)) {
            out.push(path);
        }
    }
    Ok(())
}

/// A path with its parameters blanked, so `{cid}` and `{conversation_id}` compare equal.
fn shape(path: &str) -> String {
    Regex::new(r"\{[^}]*\}")
        .expect("valid regex")
        .replace_all(path, "{}")
        .into_owned()
}

#[test]
fn item11_the_repository_documents_its_design_and_every_route_and_error_code() -> Result<()> {
    let root = repo();
    let design = read(&root.join("docs/design.md"))?;
    let api = read(&root.join("docs/api.md"))?;
    for term in [
        "epoch",
        "inbox seq",
        "order key",
        "cursor",
        "read diffusion",
        "serving region",
    ] {
        assert!(
            design.to_lowercase().contains(term),
            "docs/design.md explains {term:?}"
        );
    }

    // Every route of the OpenAPI document (generated from the route table).
    let cfg = GatewayConfig::new(RegionId::parse("us")?, "docs-test-secret", "docs-test-admin-key");
    let doc = meridian_gateway::routes::openapi_document(&cfg);
    let documented: Vec<String> =
        Regex::new(r"/v1/[A-Za-z0-9_/{}-]*|/(?:healthz|readyz|metrics|openapi\.json)")?
            .find_iter(&api)
            .map(|m| shape(m.as_str().trim_end_matches('/')))
            .collect();
    let paths = doc["paths"].as_object().context("the document has paths")?;
    assert!(paths.len() > 20, "the route table is read: {} paths", paths.len());
    let missing: Vec<&String> = paths.keys().filter(|p| !documented.contains(&shape(p))).collect();
    assert!(missing.is_empty(), "docs/api.md does not describe {missing:?}");

    // Every error code the gateway answers with.
    let code = Regex::new(
        r#"(?s)(?:ApiError::new\(\s*[A-Za-z_:]+,|ApiError::bad_request\(|ApiError::conflict\(|ApiError::not_found\()\s*"([a-z_]+)""#,
    )?;
    let mut sources = Vec::new();
    files(&root.join("services/gateway/src"), &[".rs"], &mut sources)?;
    let mut codes = std::collections::BTreeSet::new();
    for file in &sources {
        for c in code.captures_iter(&read(file)?) {
            codes.insert(c[1].to_string());
        }
    }
    assert!(codes.len() > 10, "the gateway's error codes are found: {codes:?}");
    let undocumented: Vec<&String> = codes.iter().filter(|c| !api.contains(c.as_str())).collect();
    assert!(
        undocumented.is_empty(),
        "docs/api.md does not list the error codes {undocumented:?}"
    );

    // Nothing points at the planning documents outside the repository.
    let mut tree = Vec::new();
    for dir in ["services", "tests", "proto", "deploy", "regions", "docs"] {
        files(
            &root.join(dir),
            &[".rs", ".md", ".toml", ".proto", ".sh"],
            &mut tree,
        )?;
    }
    for top in ["README.md", "ARCHITECTURE.md"] {
        tree.push(root.join(top));
    }
    let outside = Regex::new(r"\.\./shared|\bDESIGN\.md|\bAPI\.md")?;
    let this_file = root.join("tests/docs.rs");
    let pointing: Vec<String> = tree
        .iter()
        .filter(|f| **f != this_file)
        .filter_map(|f| {
            let text = read(f).ok()?;
            outside
                .is_match(&text)
                .then(|| f.strip_prefix(&root).unwrap_or(f).display().to_string())
        })
        .collect();
    assert!(
        pointing.is_empty(),
        "these files point outside the repository instead of docs/: {pointing:?}"
    );
    Ok(())
}
