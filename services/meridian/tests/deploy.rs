//! Issue 9 item 9: the production manifests under deploy/ cannot run here (no container engine,
//! no images, no TiKV), so this checks offline everything that can be checked without them
//! (deploy/README.md, "What the test validates"):
//!
//! - every nats-server configuration passes `nats-server -t`, with the includes and TLS files
//!   it names made the way an operator makes them (`meridian nats-auth`, certificates of one
//!   CA), and every variable it references set by the container that loads it;
//! - every YAML file parses; the Kubernetes objects of each kustomization (base, overlays, hub)
//!   are complete (apiVersion, kind, metadata.name), images are pinned by tag, containers have
//!   resource limits, the gateway has its probes and its scrape annotation, and every
//!   ConfigMap/Secret key a container reads (env, volume, projected volume) exists;
//! - the region file each Meridian container loads parses as [`RegionConfig`] with the
//!   container's environment (the Secrets' keys in place of the placeholders), for the role
//!   its command runs; the Compose trial likewise.
//!
//! - the committed NATS configurations run: a region node joins the hub over TLS with its nkey,
//!   and two regions of three nodes each replicate an R3 stream into an R3 mirror through the
//!   hub.
//!
//! Kustomize itself is not needed: the kustomizations are resolved here (resources,
//! configMapGenerator, secretGenerator). When `kubectl` is on PATH, the overlays are also
//! rendered by its kustomize, with credentials made as deploy/README.md says, and the rendered
//! objects checked the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use meridian::config::RegionConfig;
use meridian_bus::BusRole;
use meridian_model::RegionId;
use serde::Deserialize as _;
use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

/// Files under `dir` whose name ends with one of `suffixes`, sorted. Folders named `secrets`
/// are skipped: they hold what the operator makes, never committed (.gitignore).
fn files_under(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if path.is_dir() {
                if name != "secrets" {
                    stack.push(path);
                }
            } else if suffixes.iter().any(|s| name.ends_with(s)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `path` without `..` when it exists (operator-made files under secrets/ may not).
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo()).unwrap_or(path).display().to_string()
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", rel(path)));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{} is not YAML: {e}", rel(path))))
        .filter(|v| !v.is_null())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Kustomizations, resolved without kustomize.

/// Where a ConfigMap or Secret key's value comes from.
#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    Literal(String),
    /// Data of an object (a plain ConfigMap, or one rendered by kubectl kustomize).
    Data,
}

/// The objects one kustomization produces, and the keys of every ConfigMap and Secret in it.
#[derive(Default)]
struct Kustomized {
    objects: Vec<(String, Value)>,
    /// ("ConfigMap" | "Secret", name) -> key -> where its value comes from.
    data: BTreeMap<(String, String), BTreeMap<String, Source>>,
    namespace: Option<String>,
}

impl Kustomized {
    fn key(&self, kind: &str, name: &str, key: &str) -> Option<&Source> {
        self.data.get(&(kind.to_string(), name.to_string()))?.get(key)
    }

    fn add_object(&mut self, origin: String, obj: Value) {
        let kind = s(&obj["kind"]).to_string();
        if kind == "ConfigMap" || kind == "Secret" {
            let name = s(&obj["metadata"]["name"]).to_string();
            let entry = self.data.entry((kind, name)).or_default();
            for field in ["data", "stringData", "binaryData"] {
                if let Some(m) = obj[field].as_mapping() {
                    for k in m.keys() {
                        entry.insert(s(k).to_string(), Source::Data);
                    }
                }
            }
        }
        self.objects.push((origin, obj));
    }
}

/// Resolves the kustomization in `dir`: its resources (files and folders, recursively) and
/// its ConfigMap and Secret generators.
fn kustomize(dir: &Path) -> Kustomized {
    let file = dir.join("kustomization.yaml");
    let docs = yaml_docs(&file);
    let k = &docs[0];
    let mut out = Kustomized {
        namespace: k["namespace"].as_str().map(str::to_string),
        ..Default::default()
    };
    for r in seq(&k["resources"]) {
        let path = canonical(&dir.join(s(r)));
        if path.is_dir() {
            let inner = kustomize(&path);
            out.objects.extend(inner.objects);
            for (id, keys) in inner.data {
                out.data.entry(id).or_default().extend(keys);
            }
        } else {
            for obj in yaml_docs(&path) {
                out.add_object(rel(&path), obj);
            }
        }
    }
    for (field, kind) in [("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")] {
        for g in seq(&k[field]) {
            let name = s(&g["name"]).to_string();
            assert!(!name.is_empty(), "{}: a {field} entry without a name", rel(&file));
            assert!(
                g["envs"].is_null() && g["env"].is_null(),
                "{}: {name}: env-file generators are not resolved by this test; use files/literals",
                rel(&file)
            );
            let keys = out.data.entry((kind.to_string(), name)).or_default();
            for f in seq(&g["files"]) {
                let (key, path) = match s(f).split_once('=') {
                    Some((key, path)) => (key.to_string(), path.to_string()),
                    None => (
                        Path::new(s(f))
                            .file_name()
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                        s(f).to_string(),
                    ),
                };
                keys.insert(key, Source::File(canonical(&dir.join(path))));
            }
            for l in seq(&g["literals"]) {
                let (key, value) = s(l)
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{}: literal {:?} is not key=value", rel(&file), s(l)));
                keys.insert(key.to_string(), Source::Literal(value.to_string()));
            }
        }
    }
    out
}

/// The kustomizations an operator applies: each region's overlay and the hub. The base is
/// checked through the overlays (alone it lacks what they generate).
fn applied_kustomizations() -> Vec<PathBuf> {
    let mut out = overlay_dirs();
    out.push(deploy_dir().join("k8s/hub"));
    out
}

fn overlay_dirs() -> Vec<PathBuf> {
    let dir = deploy_dir().join("k8s/overlays");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    out.sort();
    out
}

const WORKLOADS: [&str; 5] = ["Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"];

/// (object name, pod spec, container) for every container of every workload.
fn containers(k: &Kustomized) -> Vec<(String, &Value, &Value)> {
    let mut out = Vec::new();
    for (_, obj) in &k.objects {
        if !WORKLOADS.contains(&s(&obj["kind"])) {
            continue;
        }
        let pod = &obj["spec"]["template"]["spec"];
        for c in seq(&pod["containers"]).iter().chain(seq(&pod["initContainers"])) {
            out.push((s(&obj["metadata"]["name"]).to_string(), pod, c));
        }
    }
    out
}

fn is_meridian(container: &Value) -> bool {
    let image = s(&container["image"]);
    let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
    repo.rsplit('/').next() == Some("meridian")
}

/// The `meridian` subcommand a container runs (`gateway`, `applier`, `region`).
fn meridian_role(container: &Value) -> String {
    let args: Vec<&str> = seq(&container["command"])
        .iter()
        .chain(seq(&container["args"]))
        .map(s)
        .filter(|a| *a != "meridian" && !a.ends_with("/meridian"))
        .collect();
    args.first().copied().unwrap_or_default().to_string()
}

/// The value after `--config` in a container's command line.
fn config_arg(args: &[&str]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == "--config" {
            args.get(i + 1).map(|s| s.to_string())
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        }
    })
}

fn container_args(container: &Value) -> Vec<&str> {
    seq(&container["command"])
        .iter()
        .chain(seq(&container["args"]))
        .map(s)
        .collect()
}

/// ("ConfigMap" | "Secret", its volume source) of a pod volume, a projected one's each.
fn volume_sources(volume: &Value) -> Vec<(&'static str, &Value)> {
    let mut out = Vec::new();
    for v in std::iter::once(volume).chain(seq(&volume["projected"]["sources"])) {
        if !v["configMap"].is_null() {
            out.push(("ConfigMap", &v["configMap"]));
        }
        if !v["secret"].is_null() {
            out.push(("Secret", &v["secret"]));
        }
    }
    out
}

/// ("ConfigMap" | "Secret", name, key) of the file a container sees at `path`, through its
/// volume mounts and the pod's configMap, secret and projected volumes.
fn mounted_key(pod: &Value, container: &Value, path: &str) -> Option<(String, String, String)> {
    for m in seq(&container["volumeMounts"]) {
        let mount = s(&m["mountPath"]).trim_end_matches('/');
        let Some(sub) = path.strip_prefix(mount).and_then(|p| p.strip_prefix('/')) else {
            continue;
        };
        let volume = seq(&pod["volumes"]).iter().find(|v| v["name"] == m["name"])?;
        for (kind, src) in volume_sources(volume) {
            let name = src["name"]
                .as_str()
                .or(src["secretName"].as_str())
                .unwrap_or_default();
            for item in seq(&src["items"]) {
                if s(&item["path"]) == sub {
                    return Some((kind.to_string(), name.to_string(), s(&item["key"]).to_string()));
                }
            }
        }
    }
    None
}

/// Problems of one kustomization's objects; empty when complete.
fn check_objects(k: &Kustomized, origin: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, obj) in &k.objects {
        for field in ["apiVersion", "kind"] {
            if s(&obj[field]).is_empty() {
                problems.push(format!("{file}: an object without {field}"));
            }
        }
        if s(&obj["metadata"]["name"]).is_empty() {
            problems.push(format!("{file}: a {} without metadata.name", s(&obj["kind"])));
        }
    }
    for (workload, pod, c) in containers(k) {
        let name = format!("{origin}: {workload}/{}", s(&c["name"]));
        let image = s(&c["image"]);
        let tag = image
            .rsplit_once(':')
            .filter(|(_, t)| !t.contains('/'))
            .map(|(_, t)| t);
        match tag {
            None => problems.push(format!("{name}: image {image:?} has no tag")),
            Some("latest") => problems.push(format!("{name}: image {image:?} is not pinned")),
            Some(_) => {}
        }
        for res in ["cpu", "memory"] {
            if c["resources"]["limits"][res].is_null() {
                problems.push(format!("{name}: no resources.limits.{res}"));
            }
        }
        let volumes: BTreeSet<&str> = seq(&pod["volumes"]).iter().map(|v| s(&v["name"])).collect();
        let claims: BTreeSet<String> = k
            .objects
            .iter()
            .filter(|(_, o)| s(&o["metadata"]["name"]) == workload)
            .flat_map(|(_, o)| seq(&o["spec"]["volumeClaimTemplates"]))
            .map(|t| s(&t["metadata"]["name"]).to_string())
            .collect();
        for m in seq(&c["volumeMounts"]) {
            let v = s(&m["name"]);
            if !volumes.contains(v) && !claims.contains(v) {
                problems.push(format!(
                    "{name}: mounts volume {v:?}, which the pod does not define"
                ));
            }
        }
        // Every key the container reads exists (none of these references is optional).
        let mut refs: Vec<(String, String, String)> = Vec::new();
        for e in seq(&c["env"]) {
            let from = &e["valueFrom"];
            if !from["configMapKeyRef"].is_null() {
                let r = &from["configMapKeyRef"];
                refs.push(("ConfigMap".into(), s(&r["name"]).into(), s(&r["key"]).into()));
            }
            if !from["secretKeyRef"].is_null() {
                let r = &from["secretKeyRef"];
                refs.push(("Secret".into(), s(&r["name"]).into(), s(&r["key"]).into()));
            }
        }
        for m in seq(&c["volumeMounts"]) {
            let Some(volume) = seq(&pod["volumes"]).iter().find(|v| v["name"] == m["name"]) else {
                continue;
            };
            for (kind, src) in volume_sources(volume) {
                let object = src["name"]
                    .as_str()
                    .or(src["secretName"].as_str())
                    .unwrap_or_default();
                let items = seq(&src["items"]);
                if items.is_empty() && !k.data.contains_key(&(kind.to_string(), object.to_string())) {
                    problems.push(format!("{name}: mounts {kind} {object:?}, which does not exist"));
                }
                for item in items {
                    refs.push((kind.to_string(), object.to_string(), s(&item["key"]).to_string()));
                }
            }
        }
        for (kind, object, key) in refs {
            if k.key(&kind, &object, &key).is_none() {
                problems.push(format!(
                    "{name}: reads key {key:?} of {kind} {object:?}, which does not exist"
                ));
            }
        }
        // The roles that serve HTTP (gateway, and region: every role in one process) are
        // probed on it and scraped. `meridian applier` serves no HTTP at all (README, "Gaps"):
        // Kubernetes restarts it when it exits, and its lag shows in the gateways' /readyz.
        if is_meridian(c) && ["gateway", "region"].contains(&meridian_role(c).as_str()) {
            let ports: BTreeMap<String, String> = seq(&c["ports"])
                .iter()
                .map(|p| {
                    let n = p["containerPort"].as_u64().unwrap_or(0).to_string();
                    (s(&p["name"]).to_string(), n)
                })
                .collect();
            let port_number = |v: &Value| match v {
                Value::Number(n) => Some(n.to_string()),
                Value::String(p) => ports.get(p).cloned(),
                _ => None,
            };
            for (probe, path) in [
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz?scope=local"),
            ] {
                let get = &c[probe]["httpGet"];
                if s(&get["path"]) != path || port_number(&get["port"]).is_none() {
                    problems.push(format!(
                        "{name}: {probe} is not an httpGet of {path} on a container port"
                    ));
                }
            }
            let http_port = port_number(&c["livenessProbe"]["httpGet"]["port"]);
            let obj = k
                .objects
                .iter()
                .find(|(_, o)| s(&o["metadata"]["name"]) == workload && WORKLOADS.contains(&s(&o["kind"])))
                .map(|(_, o)| o)
                .expect("the workload");
            let ann = &obj["spec"]["template"]["metadata"]["annotations"];
            if s(&ann["prometheus.io/path"]) != "/metrics"
                || Some(s(&ann["prometheus.io/port"]).to_string()) != http_port
            {
                problems.push(format!(
                    "{name}: /metrics is not announced for scraping (prometheus.io/path, prometheus.io/port)"
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// nats-server configurations.

/// The `$NAME` variables a nats-server configuration references, outside comments and quoted
/// strings (`$JS.<domain>.API` in a comment is not one).
fn config_variables(text: &str) -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for line in text.lines() {
        let mut quoted = false;
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '"' => quoted = !quoted,
                '#' if !quoted => break,
                '$' if !quoted => {
                    let name: String = chars[i + 1..]
                        .iter()
                        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
                        .collect();
                    i += name.len();
                    if !name.is_empty() {
                        vars.insert(name);
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }
    vars
}

/// The quoted files of `include "..."` lines.
fn config_includes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("include"))
        .map(|rest| rest.trim().trim_matches('"').to_string())
        .collect()
}

/// Absolute paths the configurations use inside their containers, mapped into a temporary
/// directory for `nats-server -t` (which opens the TLS files and checks the store dir's
/// parent, but runs here, not in the container).
const CONTAINER_ROOTS: [(&str, &str); 3] = [
    ("/etc/nats/", "etc/"),
    ("/data/", "data/"),
    ("/var/run/nats/", "run/"),
];

/// A CA and, per name, a certificate signed by it with its key, as PEM.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    /// (certificate, key) for `name`.
    fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        // Every certificate also names localhost: the run-time tests dial the hub there.
        let cert = rcgen::CertificateParams::new(vec![name.to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The leafnode user of the hub (its seed in every region, its public key in the hub).
struct LeafUser {
    seed: String,
    public: String,
}

impl LeafUser {
    fn new() -> LeafUser {
        let key = nkeys::KeyPair::new_user();
        LeafUser {
            seed: key.seed().unwrap(),
            public: key.public_key(),
        }
    }
}

/// A value for each variable the configurations may use, as the pods set them.
fn variable_value(name: &str, leaf: &LeafUser) -> Option<String> {
    Some(match name {
        "SERVER_NAME" => "nats-0".to_string(),
        "REGION" => "us".to_string(),
        "HUB_URL" => "nats-leaf://hub.meridian.example.com:7422".to_string(),
        "LEAF_NKEY_SEED" => leaf.seed.clone(),
        "LEAF_NKEY" => leaf.public.clone(),
        _ => return None,
    })
}

/// Lays out `conf` as its container sees it, in `root`: the file (container paths mapped into
/// `root`), its includes (a file beside it in the repository, or `auth.conf` made by
/// `meridian nats-auth`), and every TLS file it names (one CA). Returns the file to check.
fn lay_out_nats_config(conf: &Path, root: &Path, pki: &Pki) -> PathBuf {
    let text = std::fs::read_to_string(conf).unwrap();
    let mut mapped = text.clone();
    for (container, local) in CONTAINER_ROOTS {
        let to = format!("{}/", root.join(local.trim_end_matches('/')).display());
        mapped = mapped.replace(container, &to);
        std::fs::create_dir_all(root.join(local)).unwrap();
    }
    let etc = root.join("etc");
    for include in config_includes(&text) {
        let beside = conf.parent().unwrap().join(&include);
        let target = etc.join(&include);
        if beside.is_file() {
            std::fs::copy(&beside, &target).unwrap();
        } else if include == "auth.conf" {
            let out = root.join("nats-auth");
            let region = RegionId::parse("us").unwrap();
            meridian::nats_auth::write(&region, &mirrors_of(&region), &out, None).unwrap();
            std::fs::copy(out.join("us-auth.conf"), &target).unwrap();
        } else {
            panic!(
                "{}: include {include:?} is neither beside it nor made by meridian nats-auth",
                rel(conf)
            );
        }
    }
    // Every quoted path under the mapped /etc/nats/tls/ is a certificate or its key (one pair
    // per file stem, issued by the CA) or the CA itself (ca.crt).
    let tls_dir = format!("{}/tls/", etc.display());
    let stems: BTreeSet<PathBuf> = mapped
        .split('"')
        .filter(|p| p.starts_with(&tls_dir))
        .map(|p| PathBuf::from(p).with_extension(""))
        .collect();
    for stem in stems {
        std::fs::create_dir_all(stem.parent().unwrap()).unwrap();
        let name = stem.file_name().unwrap().to_string_lossy().into_owned();
        if name == "ca" {
            std::fs::write(stem.with_extension("crt"), pki.ca.pem()).unwrap();
        } else {
            let (cert, key) = pki.issue(&name);
            std::fs::write(stem.with_extension("crt"), cert).unwrap();
            std::fs::write(stem.with_extension("key"), key).unwrap();
        }
    }
    let out = etc.join(conf.file_name().unwrap());
    std::fs::write(&out, mapped).unwrap();
    out
}

fn nats_check(conf: &Path, vars: &[(String, String)]) -> std::process::Output {
    Command::new(meridian_bus::testing::binary())
        .arg("-t")
        .arg("-c")
        .arg(conf)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("nats-server runs")
}

#[test]
fn item9_every_nats_config_passes_nats_server_check() {
    let confs = files_under(&deploy_dir(), &[".conf"]);
    let names: Vec<String> = confs.iter().map(|c| rel(c)).collect();
    for expected in [
        "deploy/k8s/base/nats.conf",
        "deploy/k8s/hub/hub.conf",
        "deploy/compose/nats/region.conf",
        "deploy/compose/nats/hub.conf",
    ] {
        assert!(
            names.contains(&expected.to_string()),
            "{expected} not found among {names:?}"
        );
    }
    let pki = Pki::new();
    let leaf = LeafUser::new();
    for conf in &confs {
        let dir = tempfile::tempdir().unwrap();
        let laid_out = lay_out_nats_config(conf, dir.path(), &pki);
        let text = std::fs::read_to_string(conf).unwrap();
        let vars: Vec<(String, String)> = config_variables(&text)
            .into_iter()
            .map(|v| {
                let value = variable_value(&v, &leaf)
                    .unwrap_or_else(|| panic!("{}: variable ${v} has no value in this test", rel(conf)));
                (v, value)
            })
            .collect();
        let out = nats_check(&laid_out, &vars);
        assert!(
            out.status.success(),
            "nats-server -t {} failed:\n{}{}",
            rel(conf),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The check sees the variables: without one, the same file is refused.
        if let Some((missing, _)) = vars.first() {
            let fewer: Vec<_> = vars.iter().filter(|(k, _)| k != missing).cloned().collect();
            let out = nats_check(&laid_out, &fewer);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains(missing.as_str()),
                "{} passed without ${missing}: {err}",
                rel(conf)
            );
        }
    }
}

/// Every variable a nats-server configuration references is set by the container that loads
/// it (nats-server refuses to start otherwise), in Kubernetes and in Compose.
#[test]
fn item9_nats_containers_set_every_variable_their_config_uses() {
    let mut checked = 0;
    for dir in applied_kustomizations() {
        let k = kustomize(&dir);
        for (workload, pod, c) in containers(&k) {
            let args = container_args(c);
            let Some(path) = config_arg(&args) else { continue };
            if !path.ends_with(".conf") {
                continue;
            }
            let (kind, object, key) = mounted_key(pod, c, &path).unwrap_or_else(|| {
                panic!("{}: {workload} loads {path}, which no volume provides", rel(&dir))
            });
            let Some(Source::File(file)) = k.key(&kind, &object, &key) else {
                panic!(
                    "{}: {workload}: {kind} {object} key {key} is not a file of the repository",
                    rel(&dir)
                );
            };
            let env: BTreeSet<&str> = seq(&c["env"]).iter().map(|e| s(&e["name"])).collect();
            for var in config_variables(&std::fs::read_to_string(file).unwrap()) {
                assert!(
                    env.contains(var.as_str()),
                    "{}: {workload} loads {} but does not set ${var}",
                    rel(&dir),
                    rel(file)
                );
            }
            checked += 1;
        }
    }
    let compose_file = deploy_dir().join("compose/compose.yaml");
    let compose = compose(&compose_file);
    for (service, svc) in compose["services"].as_mapping().unwrap() {
        let args: Vec<&str> = seq(&svc["command"]).iter().map(s).collect();
        let Some(path) = config_arg(&args).filter(|p| p.ends_with(".conf")) else {
            continue;
        };
        let file = compose_mount_source(&compose_file, svc, &path)
            .unwrap_or_else(|| panic!("compose: {} loads {path}, which no volume provides", s(service)));
        let env: BTreeSet<&str> = svc["environment"]
            .as_mapping()
            .map(|m| m.keys().map(s).collect())
            .unwrap_or_default();
        for var in config_variables(&std::fs::read_to_string(&file).unwrap()) {
            assert!(
                env.contains(var.as_str()),
                "compose: {} does not set ${var}",
                s(service)
            );
        }
        checked += 1;
    }
    // The NATS of each overlay and of the hub, and the trial's four servers.
    assert!(checked >= 7, "only {checked} nats containers found");
}

// ---------------------------------------------------------------------------------------------
// YAML and Kubernetes objects.

#[test]
fn item9_every_yaml_file_parses_and_every_kustomization_is_complete() {
    let yamls = files_under(&deploy_dir(), &[".yaml", ".yml"]);
    assert!(yamls.len() >= 10, "{} YAML files", yamls.len());
    for y in &yamls {
        assert!(!yaml_docs(y).is_empty(), "{} holds no document", rel(y));
    }
    let mut problems = Vec::new();
    for dir in applied_kustomizations() {
        let k = kustomize(&dir);
        problems.extend(check_objects(&k, &rel(&dir)));
        // Files the generators read exist, except those the operator makes under secrets/.
        for keys in k.data.values() {
            for source in keys.values() {
                if let Source::File(f) = source {
                    let under_secrets = f.components().any(|c| c.as_os_str() == "secrets");
                    if !under_secrets && !f.is_file() {
                        problems.push(format!(
                            "{}: generator file {} does not exist",
                            rel(&dir),
                            f.display()
                        ));
                    }
                }
            }
        }
    }
    // The regional objects: every overlay yields the whole region.
    for dir in overlay_dirs() {
        let k = kustomize(&dir);
        let region = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut found: BTreeMap<String, u64> = BTreeMap::new();
        for (_, o) in &k.objects {
            if WORKLOADS.contains(&s(&o["kind"])) {
                let replicas = o["spec"]["replicas"].as_u64().unwrap_or(1);
                found.insert(s(&o["metadata"]["name"]).to_string(), replicas);
            }
        }
        for (workload, replicas) in [("nats", 3), ("pd", 3), ("tikv", 3), ("meridian-applier", 1)] {
            assert_eq!(
                found.get(workload),
                Some(&replicas),
                "{region}: {workload} replicas ({found:?})"
            );
        }
        assert!(
            found.get("meridian-gateway").is_some_and(|r| *r >= 2),
            "{region}: {found:?}"
        );
        assert!(found.contains_key("otel-collector"), "{region}: {found:?}");
        assert_eq!(
            k.namespace.as_deref(),
            Some(format!("meridian-{region}").as_str())
        );
        let Some(Source::Literal(id)) = k.key("ConfigMap", "meridian-region", "region") else {
            panic!("{region}: ConfigMap meridian-region has no literal region");
        };
        assert_eq!(*id, region, "the overlay's JetStream domain is its region id");
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The checks above are not vacuous: a manifest with each defect is reported.
#[test]
fn item9_the_manifest_checks_report_each_defect() {
    let base = kustomize(&deploy_dir().join("k8s/overlays/us"));
    assert!(
        check_objects(&base, "us").is_empty(),
        "{:?}",
        check_objects(&base, "us")
    );
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut k = kustomize(&deploy_dir().join("k8s/overlays/us"));
        let (_, gw) = k
            .objects
            .iter_mut()
            .find(|(_, o)| s(&o["metadata"]["name"]) == "meridian-gateway" && s(&o["kind"]) == "Deployment")
            .unwrap();
        edit(&mut gw["spec"]["template"]["spec"]["containers"][0]);
        check_objects(&k, "us").join("\n")
    };
    let p = broken(&|c| c["image"] = Value::from("registry.example.com/meridian:latest"));
    assert!(p.contains("not pinned"), "{p}");
    let p = broken(&|c| c["image"] = Value::from("registry.example.com:5000/meridian"));
    assert!(p.contains("no tag"), "{p}");
    let p = broken(&|c| c["readinessProbe"] = Value::Null);
    assert!(p.contains("readinessProbe"), "{p}");
    let p = broken(&|c| c["resources"]["limits"] = Value::Null);
    assert!(p.contains("resources.limits.memory"), "{p}");
    let p = broken(&|c| {
        let env = c["env"].as_sequence_mut().unwrap();
        let jwt = env
            .iter_mut()
            .find(|e| e["name"] == "MERIDIAN__GATEWAY__JWT_SECRET")
            .unwrap();
        jwt["valueFrom"]["secretKeyRef"]["key"] = Value::from("jwt");
    });
    assert!(p.contains(r#"key "jwt" of Secret "meridian-keys""#), "{p}");
}

// ---------------------------------------------------------------------------------------------
// Region files, as each Meridian container loads them.

const TEST_JWT_SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const TEST_ADMIN_KEY: &str = "deploy-test-admin-key";

/// A test value for a Secret key the manifests read.
fn secret_value(key: &str) -> Option<&'static str> {
    match key {
        "jwt_secret" | "MERIDIAN__GATEWAY__JWT_SECRET" => Some(TEST_JWT_SECRET),
        "admin_key" | "MERIDIAN__GATEWAY__ADMIN_KEY" => Some(TEST_ADMIN_KEY),
        _ => None,
    }
}

/// Loads the region file as `meridian <role>` would with `env`, after pointing the seed file
/// at a real seed made by `meridian nats-auth` (the name the manifests give it must be one
/// that command writes). Checks the region and the role.
fn load_region_file(
    origin: &str,
    file: &Path,
    mut env: Vec<(String, String)>,
    seed_source: &Path,
    role: &str,
    region: &str,
) -> RegionConfig {
    let creds = tempfile::tempdir().unwrap();
    let id = RegionId::parse(region).unwrap();
    meridian::nats_auth::write(&id, &mirrors_of(&id), creds.path(), None).unwrap();
    let seed = creds.path().join(seed_source.file_name().unwrap());
    assert!(
        seed.is_file(),
        "{origin}: {} is not a file `meridian nats-auth --region {region}` writes",
        seed_source.display()
    );
    for (k, v) in env.iter_mut() {
        if k == "MERIDIAN__BUS__NKEY_SEED_FILE" {
            *v = seed.display().to_string();
        }
    }
    let text = std::fs::read_to_string(file).unwrap();
    let cfg = RegionConfig::from_toml(&text, &rel(file), env.clone())
        .unwrap_or_else(|e| panic!("{origin}: {} with the container's environment: {e}", rel(file)));
    assert_eq!(cfg.region.as_str(), region, "{origin}");
    assert!(cfg.store.starts_with("tikv://"), "{origin}: store {}", cfg.store);
    let expected = match role {
        "gateway" => BusRole::Gateway,
        "applier" => BusRole::Applier,
        other => panic!("{origin}: unexpected role {other}"),
    };
    assert_eq!(cfg.bus.role, Some(expected), "{origin}");
    assert!(cfg.bus.nkey_seed_file.is_some(), "{origin}: no NATS login");
    // The placeholders of the file are what the Secrets replace: without them it is refused.
    let without: Vec<_> = env
        .into_iter()
        .filter(|(k, _)| secret_value(k).is_none())
        .collect();
    let err = RegionConfig::from_toml(&text, &rel(file), without)
        .unwrap_err()
        .to_string();
    assert!(err.contains("placeholder"), "{origin}: {err}");
    cfg
}

#[test]
fn item9_region_files_parse_with_each_containers_environment() {
    let mut loaded = 0;
    for dir in overlay_dirs() {
        let region = dir.file_name().unwrap().to_string_lossy().into_owned();
        let k = kustomize(&dir);
        for (workload, pod, c) in containers(&k) {
            if !is_meridian(c) {
                continue;
            }
            let origin = format!("{}: {workload}", rel(&dir));
            let args = container_args(c);
            let path = config_arg(&args).unwrap_or_else(|| panic!("{origin}: no --config"));
            let (kind, object, key) =
                mounted_key(pod, c, &path).unwrap_or_else(|| panic!("{origin}: nothing mounted at {path}"));
            let Some(Source::File(file)) = k.key(&kind, &object, &key) else {
                panic!("{origin}: {path} is not a file of the repository");
            };
            assert_eq!(
                file.canonicalize().unwrap(),
                repo().join(format!("regions/{region}.toml")),
                "{origin}: the region file is the repository's"
            );
            let mut env = Vec::new();
            let mut seed_source = None;
            for e in seq(&c["env"]) {
                let name = s(&e["name"]).to_string();
                let from = &e["valueFrom"];
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else if !from["secretKeyRef"].is_null() {
                    let key = s(&from["secretKeyRef"]["key"]);
                    secret_value(key)
                        .unwrap_or_else(|| panic!("{origin}: no test value for Secret key {key}"))
                        .to_string()
                } else if !from["configMapKeyRef"].is_null() {
                    let r = &from["configMapKeyRef"];
                    match k.key("ConfigMap", s(&r["name"]), s(&r["key"])) {
                        Some(Source::Literal(v)) => v.clone(),
                        other => panic!("{origin}: {name} from {other:?}"),
                    }
                } else {
                    continue;
                };
                if name == "MERIDIAN__BUS__NKEY_SEED_FILE" {
                    let (kind, object, key) = mounted_key(pod, c, &value)
                        .unwrap_or_else(|| panic!("{origin}: nothing mounted at {value}"));
                    match k.key(&kind, &object, &key) {
                        Some(Source::File(f)) => seed_source = Some(f.clone()),
                        other => panic!("{origin}: the seed comes from {other:?}"),
                    }
                }
                env.push((name, value));
            }
            let seed_source =
                seed_source.unwrap_or_else(|| panic!("{origin}: no MERIDIAN__BUS__NKEY_SEED_FILE"));
            let role = meridian_role(c);
            let cfg = load_region_file(&origin, file, env, &seed_source, &role, &region);
            assert!(cfg.store.contains("pd-0.pd:2379"), "{origin}: {}", cfg.store);
            loaded += 1;
        }
    }
    assert!(
        loaded >= 6,
        "gateway and applier of every overlay; loaded {loaded}"
    );
}

// ---------------------------------------------------------------------------------------------
// The Compose trial.

fn compose(path: &Path) -> Value {
    let mut doc = yaml_docs(path).remove(0);
    // YAML merge keys (`<<: *nats`), which Compose applies.
    doc.apply_merge().unwrap();
    doc
}

/// The host file a Compose service mounts at `target` (`./src:target[:ro]`).
fn compose_mount_source(compose_file: &Path, svc: &Value, target: &str) -> Option<PathBuf> {
    seq(&svc["volumes"]).iter().find_map(|v| {
        let mut parts = s(v).split(':');
        let (src, dst) = (parts.next()?, parts.next()?);
        (dst == target && src.starts_with('.')).then(|| compose_file.parent().unwrap().join(src))
    })
}

#[test]
fn item9_compose_trial_is_complete_and_its_region_file_parses() {
    let file = deploy_dir().join("compose/compose.yaml");
    let doc = compose(&file);
    let services = doc["services"].as_mapping().unwrap();
    let mut problems = Vec::new();
    let mut loaded = 0;
    for (name, svc) in services {
        let name = s(name);
        let image = s(&svc["image"]);
        match image.rsplit_once(':').map(|(_, t)| t) {
            Some(t) if !t.contains('/') && t != "latest" => {}
            _ => problems.push(format!("{name}: image {image:?} is not pinned by tag")),
        }
        for v in seq(&svc["volumes"]) {
            let src = s(v).split(':').next().unwrap_or_default();
            let path = file.parent().unwrap().join(src);
            if src.starts_with('.') && !src.starts_with("./secrets/") && !path.exists() {
                problems.push(format!("{name}: mounts {src}, which does not exist"));
            }
        }
        let command: Vec<&str> = seq(&svc["command"]).iter().map(s).collect();
        let role = command.first().copied().unwrap_or_default();
        if !image.contains("/meridian:") {
            continue;
        }
        if role == "gateway" && svc["healthcheck"].is_null() {
            problems.push(format!("{name}: no healthcheck"));
        }
        // The environment as the container gets it: `environment`, then the env_file, whose
        // committed example (keys.env.example) names the keys with placeholders.
        let mut env: Vec<(String, String)> = svc["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (s(k).to_string(), s(v).to_string()))
            .collect();
        for env_file in seq(&svc["env_file"]) {
            let example = file.parent().unwrap().join("keys.env.example");
            assert_eq!(s(env_file), "./secrets/keys.env", "{name}");
            for line in std::fs::read_to_string(&example).unwrap().lines() {
                let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) else {
                    continue;
                };
                assert!(
                    v.starts_with("REPLACE_ME"),
                    "keys.env.example holds a real value for {k}"
                );
                let v = secret_value(k).unwrap_or_else(|| panic!("no test value for {k}"));
                env.push((k.to_string(), v.to_string()));
            }
        }
        let config = config_arg(&command).unwrap_or_else(|| panic!("{name}: no --config"));
        let region_file = compose_mount_source(&file, svc, &config)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {config}"));
        let seed_target = env
            .iter()
            .find(|(k, _)| k == "MERIDIAN__BUS__NKEY_SEED_FILE")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name}: no seed file"));
        let seed_source = compose_mount_source(&file, svc, &seed_target)
            .unwrap_or_else(|| panic!("{name}: no seed mounted"));
        load_region_file(
            &format!("compose: {name}"),
            &region_file,
            env,
            &seed_source,
            role,
            "us",
        );
        loaded += 1;
    }
    assert_eq!(loaded, 2, "the gateway and the applier");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// kubectl kustomize, where it is installed.

/// Renders each overlay and the hub with kubectl's kustomize after making their credentials as
/// deploy/README.md says (in a copy of deploy/k8s and regions/), and checks the rendered
/// objects like the resolved ones. Without kubectl this says so and checks nothing more (the
/// tests above cover the same objects through this file's own resolution).
#[test]
fn item9_kubectl_kustomize_renders_each_overlay_when_installed() {
    let kubectl = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .find(|k| k.is_file())
        })
        .unwrap_or_default();
    let Some(kubectl) = kubectl else {
        eprintln!("kubectl is not installed: the overlays were resolved by this test only");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| {
        let status = Command::new("cp").arg("-r").arg(from).arg(to).status().unwrap();
        assert!(status.success());
    };
    std::fs::create_dir_all(work.path().join("deploy")).unwrap();
    copy(&deploy_dir().join("k8s"), &work.path().join("deploy/k8s"));
    copy(&repo().join("regions"), &work.path().join("regions"));
    let k8s = work.path().join("deploy/k8s");
    let pki = Pki::new();
    let leaf = LeafUser::new();
    let write = |path: PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let mut targets = Vec::new();
    for dir in overlay_dirs() {
        let region = dir.file_name().unwrap().to_string_lossy().into_owned();
        let secrets = k8s.join("overlays").join(&region).join("secrets");
        // Drop whatever a local checkout holds there: the operator's steps make it anew.
        let _ = std::fs::remove_dir_all(&secrets);
        {
            let id = RegionId::parse(&region).unwrap();
            meridian::nats_auth::write(&id, &mirrors_of(&id), &secrets.join("nats"), None).unwrap();
        }
        write(secrets.join("jwt_secret"), TEST_JWT_SECRET);
        write(secrets.join("admin_key"), TEST_ADMIN_KEY);
        write(secrets.join("leaf.nk"), &leaf.seed);
        let (cert, key) = pki.issue("nats-leaf");
        write(secrets.join("tls/leaf.crt"), &cert);
        write(secrets.join("tls/leaf.key"), &key);
        write(secrets.join("tls/ca.crt"), &pki.ca.pem());
        targets.push(k8s.join("overlays").join(&region));
    }
    let hub_secrets = k8s.join("hub/secrets");
    let _ = std::fs::remove_dir_all(&hub_secrets);
    write(hub_secrets.join("leaf.pub"), &leaf.public);
    let (cert, key) = pki.issue("hub.meridian.example.com");
    write(hub_secrets.join("tls/hub.crt"), &cert);
    write(hub_secrets.join("tls/hub.key"), &key);
    write(hub_secrets.join("tls/ca.crt"), &pki.ca.pem());
    targets.push(k8s.join("hub"));
    for target in targets {
        let out = Command::new(&kubectl)
            .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
            .arg(&target)
            .output()
            .unwrap();
        let name = target.strip_prefix(work.path()).unwrap().display().to_string();
        assert!(
            out.status.success(),
            "kubectl kustomize {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut k = Kustomized::default();
        for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
            k.add_object(name.clone(), Value::deserialize(doc).unwrap());
        }
        assert!(k.objects.len() >= 5, "{name}: {} objects", k.objects.len());
        let problems = check_objects(&k, &name);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------
// The production topology at run time.

/// The regions `region` mirrors: every other region with a file in regions/, as
/// `meridian nats-auth --mirrors` is told in deploy/README.md.
fn mirrors_of(region: &RegionId) -> Vec<RegionId> {
    let dir = deploy_dir().join("../regions");
    let mut out: Vec<RegionId> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let stem = name.strip_suffix(".toml")?.to_string();
            Some(RegionId::parse(&stem).unwrap())
        })
        .filter(|r| r != region)
        .collect();
    out.sort();
    out
}

/// A port free right now, below the ephemeral range (see `meridian_bus::testing::free_port`).
fn free_port() -> u16 {
    meridian_bus::testing::free_port().unwrap()
}

/// `text` with its one occurrence of `from` replaced by `to`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} once in the configuration"
    );
    text.replace(from, to)
}

/// A nats-server process killed on drop.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One node of a region's cluster, or the hub, started from a committed configuration.
struct Node {
    _process: Running,
    client_port: u16,
    http_port: u16,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts `conf`, laid out by [`lay_out_nats_config`] in its own folder, with its client
    /// and monitoring ports moved to free ones, `edits` (`from`, `to`, each found once)
    /// applied, and `auth` as its auth.conf when given.
    fn start(
        conf: &Path,
        pki: &Pki,
        edits: &[(String, String)],
        auth: Option<&str>,
        vars: &[(&str, String)],
    ) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let laid_out = lay_out_nats_config(conf, dir.path(), pki);
        let mut text = std::fs::read_to_string(&laid_out).unwrap();
        for (from, to) in edits {
            text = replace_once(&text, from, to);
        }
        if let Some(auth) = auth {
            std::fs::write(dir.path().join("etc/auth.conf"), auth).unwrap();
        }
        // free_port() only finds a port free a moment ago: a test running in parallel may
        // take it before the server binds it (seen: "bind: address already in use", the node
        // exits and its cluster never elects a leader). A node that exits before it listens
        // is started again on other ports, bounded.
        let template = text;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (client_port, http_port) = (free_port(), free_port());
            let mut text = replace_once(&template, "http_port: 8222", &format!("http_port: {http_port}"));
            text = if text.contains("127.0.0.1:4222") {
                replace_once(&text, "127.0.0.1:4222", &format!("127.0.0.1:{client_port}"))
            } else {
                replace_once(&text, "port: 4222", &format!("port: {client_port}"))
            };
            std::fs::write(&laid_out, text).unwrap();
            let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
            let mut process = Running(
                Command::new(meridian_bus::testing::binary())
                    .arg("-c")
                    .arg(&laid_out)
                    .env_clear()
                    .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let listening = loop {
                if process.0.try_wait().unwrap().is_some() {
                    break false;
                }
                if std::net::TcpStream::connect(("127.0.0.1", client_port)).is_ok() {
                    break true;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} did not listen within 10 s",
                    conf.display()
                );
                // Synchronous set-up before the test's async part runs: nothing else is
                // on this thread to block.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            if listening {
                return Node {
                    _process: process,
                    client_port,
                    http_port,
                    dir,
                };
            }
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            assert!(
                attempt < 5,
                "{} exited at start 5 times; last log:\n{log}",
                conf.display()
            );
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

/// The hub from `k8s/hub/hub.conf`, its leafnode port returned too.
fn start_hub(pki: &Pki, leaf: &LeafUser) -> (Node, u16) {
    let leaf_port = free_port();
    let edits = [
        ("port: 6222".to_string(), format!("port: {}", free_port())),
        ("port: 7422".to_string(), format!("port: {leaf_port}")),
    ];
    let vars = [
        ("SERVER_NAME", "hub-0".to_string()),
        ("LEAF_NKEY", leaf.public.clone()),
    ];
    let hub = Node::start(&deploy_dir().join("k8s/hub/hub.conf"), pki, &edits, None, &vars);
    (hub, leaf_port)
}

/// Node `i` of `region` from `k8s/base/nats.conf`: its cluster port is `cluster_ports[i]` and
/// its routes the loopback ports of its peers; the rest (domain, leafnode remote with TLS and
/// the nkey, auth include) as committed.
fn start_region_node(
    region: &str,
    i: usize,
    cluster_ports: &[u16],
    hub_leaf_port: u16,
    pki: &Pki,
    leaf: &LeafUser,
    auth: Option<&str>,
) -> Node {
    let mut edits = vec![("port: 6222".to_string(), format!("port: {}", cluster_ports[i]))];
    for (j, peer) in cluster_ports.iter().enumerate() {
        edits.push((
            format!("nats-route://nats-{j}.nats:6222"),
            format!("nats-route://127.0.0.1:{peer}"),
        ));
    }
    let vars = [
        ("SERVER_NAME", format!("{region}-{i}")),
        ("REGION", region.to_string()),
        ("HUB_URL", format!("nats-leaf://localhost:{hub_leaf_port}")),
        ("LEAF_NKEY_SEED", leaf.seed.clone()),
    ];
    Node::start(&deploy_dir().join("k8s/base/nats.conf"), pki, &edits, auth, &vars)
}

const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The production hub and one node of a region, from their committed configurations, really
/// link: the hub verifies the region's client certificate and its nkey, the region verifies
/// the hub's certificate. `nats-server -t` cannot show that (it connects nothing).
#[tokio::test]
async fn item9_a_region_node_joins_the_hub_as_a_leafnode_with_tls_and_its_nkey() {
    let pki = Pki::new();
    let leaf = LeafUser::new();
    let (hub, hub_leaf) = start_hub(&pki, &leaf);
    // Its two peers are not started: the leafnode link does not need them.
    let region = start_region_node(
        "us",
        0,
        &[free_port(), free_port(), free_port()],
        hub_leaf,
        &pki,
        &leaf,
        None,
    );
    // The hub's monitoring endpoint lists its leafnodes; poll it (bounded) until the region's
    // node is there.
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let url = format!("http://127.0.0.1:{}/leafz", hub.http_port);
    let mut last = String::new();
    loop {
        if let Ok(body) = async { reqwest::get(&url).await?.text().await }.await {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["leafnodes"] == 1 {
                assert_eq!(v["leafs"][0]["name"], "us-0", "{body}");
                break;
            }
            last = body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the region never joined the hub: {last}\nhub log:\n{}\nregion log:\n{}",
            hub.log(),
            region.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The production topology at work on real servers: two regions of three nodes each, every
/// node from `k8s/base/nats.conf`, and the hub from `k8s/hub/hub.conf`. Region us holds
/// `SYNC_US` as an R3 stream; region eu holds its R3 mirror through `$JS.us.API`, which
/// reaches us only through the hub. The mirror ends up with every event at the origin's
/// sequence numbers, and both streams have a leader and two followers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_r3_stream_mirrored_across_regions_through_the_production_hub() {
    use async_nats::jetstream::{self, stream};
    let pki = Pki::new();
    let leaf = LeafUser::new();
    // The test connects as an all-subjects user beside the roles' nkey users (which may not
    // create mirrors before issue 9's bus work).
    let admin_password = format!("pw-{}", free_port());
    let auth = |region: &str| {
        let id = RegionId::parse(region).unwrap();
        let mut users: Vec<meridian_bus::NatsUser> = BusRole::ALL
            .iter()
            .map(|&role| meridian_bus::RoleCredentials::generate(role, "", &id).user)
            .collect();
        users.push(meridian_bus::NatsUser {
            login: meridian_bus::NatsLogin::Password {
                user: "admin".into(),
                password: admin_password.clone(),
            },
            permissions: None,
        });
        meridian_bus::nats_server_auth_config(&users, None)
    };
    let (hub, hub_leaf) = start_hub(&pki, &leaf);
    let mut nodes = BTreeMap::new();
    for region in ["us", "eu"] {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let auth = auth(region);
        let started: Vec<Node> = (0..3)
            .map(|i| start_region_node(region, i, &cluster_ports, hub_leaf, &pki, &leaf, Some(&auth)))
            .collect();
        nodes.insert(region, started);
    }
    let logs = || {
        let mut out = format!("hub:\n{}", hub.log());
        for (region, ns) in &nodes {
            for (i, n) in ns.iter().enumerate() {
                out.push_str(&format!("\n{region}-{i}:\n{}", n.log()));
            }
        }
        out
    };
    let connect = |port: u16| {
        // The servers are still starting: connect in the background.
        async_nats::ConnectOptions::with_user_and_password("admin".into(), admin_password.clone())
            .retry_on_initial_connect()
            .connect(format!("nats://127.0.0.1:{port}"))
    };
    let us = jetstream::new(connect(nodes["us"][0].client_port).await.unwrap());
    let eu = jetstream::new(connect(nodes["eu"][1].client_port).await.unwrap());
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let origin = stream::Config {
        name: "SYNC_US".into(),
        subjects: vec!["sync.us.>".into()],
        num_replicas: 3,
        ..Default::default()
    };
    let mirror = stream::Config {
        name: "SYNC_US".into(),
        num_replicas: 3,
        mirror: Some(stream::Source {
            name: "SYNC_US".into(),
            external: Some(stream::External {
                api_prefix: "$JS.us.API".into(),
                delivery_prefix: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Until each cluster has elected its JetStream meta leader, creating a stream fails:
    // retry, bounded.
    for (js, config, region) in [(&us, &origin, "us"), (&eu, &mirror, "eu")] {
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "creating {} in {region}: {e}\n{}",
                        config.name,
                        logs()
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
            }
        }
    }
    const EVENTS: u64 = 20;
    for i in 0..EVENTS {
        us.publish("sync.us.events", format!("event {i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut last = None;
    loop {
        if let Ok(mut s) = eu.get_stream("SYNC_US").await {
            if let Ok(info) = s.info().await {
                let followers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
                if info.state.messages == EVENTS && info.state.last_sequence == EVENTS && followers == 2 {
                    break;
                }
                last = Some((info.state.messages, info.state.last_sequence, followers));
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "eu's mirror never caught up (messages, last seq, followers): {last:?}\n{}",
            logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let info = us
        .get_stream("SYNC_US")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.map(|c| c.replicas.len()),
        Some(2),
        "R3: a leader and two followers"
    );
    // Same sequence, same event.
    let m = eu
        .get_stream("SYNC_US")
        .await
        .unwrap()
        .get_raw_message(EVENTS)
        .await
        .unwrap();
    assert_eq!(&m.payload[..], format!("event {}", EVENTS - 1).as_bytes());
}
