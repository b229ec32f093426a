//! Issue 8, item 9: a fuzz run driven by `GET /openapi.json` of a real region. For every
//! operation it generates requests from the document's schemas (valid ones, and some that
//! break one stated rule), sends them with the caller's credentials, and checks that nothing
//! answers 5xx, that every answer is a documented status with a JSON body matching the
//! documented schema, and that requests valid by the document are not refused 400: the
//! document states every rule the server enforces.
//!
//! Values whose validity depends on stored state are drawn from pools, as the document's
//! `format`s and links say (user-id: provisioned users; conversation-id, group-id: created
//! conversations; message-id and cursor: messages of the conversation in the path;
//! list-cursor: a list's next_cursor). Deterministic: a fixed seed, a bounded case count.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use meridian_e2e::{Session, TestRegion, ADMIN_KEY};
use reqwest::Method;
use serde_json::{json, Map, Value};

const SEED: u64 = 0x5eed_0009;
const VALID_CASES_PER_OPERATION: usize = 10;
const INVALID_CASES_PER_OPERATION: usize = 4;
/// The whole run's bound.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// xorshift64*: deterministic and dependency-free.
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
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            lo + (self.next() % ((hi - lo) as u64 + 1)) as i64
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len())])
        }
    }
}

/// Values that must exist for a request to be valid.
#[derive(Default)]
struct Pools {
    caller: String,
    /// Provisioned users other than the caller.
    users: Vec<String>,
    conversations: Vec<String>,
    groups: Vec<String>,
    /// (message id, cursor) per conversation.
    messages: BTreeMap<String, Vec<(String, String)>>,
    list_cursors: Vec<String>,
    /// next_cursor values of searches (`search-cursor`).
    search_cursors: Vec<String>,
}

/// A `^...$` pattern made of literals, escapes and `[...]` classes with `{m,n}`, `{n}`, `+`,
/// `*`, `?` quantifiers: the subset the document uses, which this generates from.
fn gen_pattern(pattern: &str, min_len: usize, max_len: usize, rng: &mut Rng) -> Result<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut atoms: Vec<(Vec<char>, usize, usize)> = Vec::new();
    let mut i = 0;
    let escape = |chars: &[char], i: &mut usize| -> Result<char> {
        // At a backslash: \xNN or an escaped character.
        *i += 1;
        let c = *chars.get(*i).context("dangling escape")?;
        if c == 'x' {
            let hex: String = chars.get(*i + 1..*i + 3).context("short \\x")?.iter().collect();
            *i += 3;
            return Ok(char::from(u8::from_str_radix(&hex, 16)?));
        }
        *i += 1;
        Ok(c)
    };
    while i < chars.len() {
        let set: Vec<char> = match chars[i] {
            '^' | '$' => {
                i += 1;
                continue;
            }
            '[' => {
                i += 1;
                let mut set = Vec::new();
                let mut prev: Option<char> = None;
                while chars.get(i) != Some(&']') {
                    let c = if chars[i] == '\\' {
                        escape(&chars, &mut i)?
                    } else {
                        i += 1;
                        chars[i - 1]
                    };
                    if c == '-' && prev.is_some() && chars.get(i) != Some(&']') {
                        let lo = prev.take().context("range")?;
                        let hi = if chars[i] == '\\' {
                            escape(&chars, &mut i)?
                        } else {
                            i += 1;
                            chars[i - 1]
                        };
                        set.pop();
                        set.extend(lo..=hi);
                    } else {
                        set.push(c);
                        prev = Some(c);
                    }
                }
                i += 1;
                set
            }
            '\\' => vec![escape(&chars, &mut i)?],
            c => {
                i += 1;
                vec![c]
            }
        };
        let (lo, hi) = match chars.get(i) {
            Some('{') => {
                let end = i + chars[i..].iter().position(|&c| c == '}').context("quantifier")?;
                let q: String = chars[i + 1..end].iter().collect();
                i = end + 1;
                match q.split_once(',') {
                    Some((a, b)) => (a.parse()?, b.parse()?),
                    None => (q.parse()?, q.parse()?),
                }
            }
            Some('+') => {
                i += 1;
                (1, usize::MAX)
            }
            Some('*') => {
                i += 1;
                (0, usize::MAX)
            }
            Some('?') => {
                i += 1;
                (0, 1)
            }
            _ => (1, 1),
        };
        atoms.push((set, lo, hi));
    }
    let single = atoms.len() == 1;
    let mut out = String::new();
    for (set, lo, hi) in atoms {
        // Lengths: within the quantifier and, for a one-atom pattern, min/maxLength; long
        // strings are rare so bodies stay small.
        let (mut lo, mut hi) = (lo, hi);
        if single {
            lo = lo.max(min_len);
            hi = hi.min(max_len);
        }
        let cap = if rng.chance(10) { hi } else { lo.max(12).min(hi) };
        let n = rng.range(lo as i64, cap.min(lo + 64).max(lo) as i64) as usize;
        for _ in 0..n {
            out.push(*rng.pick(&set).context("empty class")?);
        }
    }
    Ok(out)
}

struct Doc<'a> {
    root: &'a Value,
}

impl<'a> Doc<'a> {
    fn resolve(&self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let path = r.trim_start_matches("#/");
                let mut v = self.root;
                for part in path.split('/') {
                    v = &v[part];
                }
                self.resolve(v)
            }
            None => schema,
        }
    }

    /// The `format` of a schema, looking through `$ref` and `allOf`.
    fn format(&self, schema: &'a Value) -> Option<&'a str> {
        let s = self.resolve(schema);
        if let Some(f) = s.get("format").and_then(Value::as_str) {
            return Some(f);
        }
        s.get("allOf")?
            .as_array()?
            .iter()
            .find_map(|sub| self.format(sub))
    }

    /// A value valid by `schema`; `cid` is the conversation in the path, for cursors and
    /// message ids.
    fn generate(&self, schema: &'a Value, pools: &Pools, cid: Option<&str>, rng: &mut Rng) -> Result<Value> {
        let s = self.resolve(schema);
        if let Some(f) = self.format(schema) {
            let messages = cid
                .and_then(|c| pools.messages.get(c))
                .cloned()
                .unwrap_or_default();
            let pooled = match f {
                "user-id" => rng.pick(&pools.users).cloned(),
                "conversation-id" => rng.pick(&pools.conversations).cloned(),
                "group-id" => rng.pick(&pools.groups).cloned(),
                "message-id" => rng.pick(&messages).map(|m| m.0.clone()),
                "cursor" => rng.pick(&messages).map(|m| m.1.clone()),
                "list-cursor" => rng.pick(&pools.list_cursors).cloned(),
                "search-cursor" => rng.pick(&pools.search_cursors).cloned(),
                _ => None,
            };
            if let Some(v) = pooled {
                return Ok(json!(v));
            }
        }
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            return self.generate(&all[0], pools, cid, rng);
        }
        if let Some(branches) = s.get("oneOf").or(s.get("anyOf")).and_then(Value::as_array) {
            let b = rng.pick(branches).context("no branches")?;
            return self.generate(b, pools, cid, rng);
        }
        if let Some(c) = s.get("const") {
            return Ok(c.clone());
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            return Ok(rng.pick(e).context("empty enum")?.clone());
        }
        let ty = match &s["type"] {
            Value::String(t) => t.as_str(),
            Value::Array(ts) => ts.first().and_then(Value::as_str).unwrap_or("string"),
            _ => "object",
        };
        Ok(match ty {
            "string" => {
                let min = s["minLength"].as_u64().unwrap_or(0) as usize;
                let max = s["maxLength"].as_u64().unwrap_or(64) as usize;
                let pattern = s["pattern"]
                    .as_str()
                    .map_or_else(|| format!("^[a-zA-Z0-9 ]{{{min},{max}}}$"), str::to_string);
                json!(gen_pattern(&pattern, min, max, rng)?)
            }
            "integer" => {
                let lo = s["minimum"].as_i64().unwrap_or(0);
                let hi = s["maximum"].as_i64().unwrap_or(1_000);
                let v = if rng.chance(20) {
                    rng.range(lo, hi)
                } else {
                    rng.range(lo, lo.saturating_add(5).min(hi))
                };
                json!(v)
            }
            "boolean" => json!(rng.chance(50)),
            "null" => Value::Null,
            "array" => {
                let lo = s["minItems"].as_u64().unwrap_or(0) as i64;
                let hi = s["maxItems"].as_u64().unwrap_or(3).min(3) as i64;
                let n = rng.range(lo, hi.max(lo));
                let items = &s["items"];
                let mut out = Vec::new();
                for _ in 0..n {
                    out.push(self.generate(items, pools, cid, rng)?);
                }
                Value::Array(out)
            }
            _ => {
                let props = s["properties"].as_object().cloned().unwrap_or_default();
                let required: Vec<&str> = s["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let min_props = s["minProperties"].as_u64().unwrap_or(0) as usize;
                let mut out = Map::new();
                if props.is_empty() && s.get("additionalProperties") != Some(&json!(false)) {
                    out.insert("text".into(), json!(gen_pattern("^[a-z ]{1,40}$", 1, 40, rng)?));
                }
                let names: Vec<&String> = props.keys().collect();
                for name in &names {
                    if required.contains(&name.as_str()) || rng.chance(50) {
                        out.insert((*name).clone(), self.generate(&props[*name], pools, cid, rng)?);
                    }
                }
                while out.len() < min_props {
                    let name = rng.pick(&names).context("minProperties without properties")?;
                    out.insert((*name).clone(), self.generate(&props[*name], pools, cid, rng)?);
                }
                Value::Object(out)
            }
        })
    }

    /// Whether `v` matches `schema` (the subset of JSON Schema the document uses); the
    /// error says where it does not.
    fn validate(&self, schema: &'a Value, v: &Value, at: &str) -> Result<()> {
        let s = self.resolve(schema);
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            for sub in all {
                self.validate(sub, v, at)?;
            }
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(branches) = s.get(key).and_then(Value::as_array) {
                ensure!(
                    branches.iter().any(|b| self.validate(b, v, at).is_ok()),
                    "{at}: {v} matches no branch of {key}"
                );
            }
        }
        if let Some(c) = s.get("const") {
            ensure!(v == c, "{at}: {v} is not {c}");
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            ensure!(e.contains(v), "{at}: {v} is not one of {e:?}");
        }
        let types: Vec<&str> = match &s["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.is_empty() {
            let actual = match v {
                Value::Null => "null",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::String(_) => "string",
                Value::Array(_) => "array",
                Value::Object(_) => "object",
            };
            ensure!(
                types.contains(&actual) || (actual == "integer" && types.contains(&"number")),
                "{at}: {v} is not of type {types:?}"
            );
        }
        match v {
            Value::String(text) => {
                let chars = text.chars().count() as u64;
                if let Some(n) = s["minLength"].as_u64() {
                    ensure!(chars >= n, "{at}: shorter than {n}");
                }
                if let Some(n) = s["maxLength"].as_u64() {
                    ensure!(chars <= n, "{at}: longer than {n}");
                }
                if let Some(p) = s["pattern"].as_str() {
                    ensure!(
                        regex::Regex::new(p)?.is_match(text),
                        "{at}: {text:?} does not match {p}"
                    );
                }
            }
            Value::Number(n) => {
                if let (Some(min), Some(x)) = (s["minimum"].as_f64(), n.as_f64()) {
                    ensure!(x >= min, "{at}: {x} below {min}");
                }
                if let (Some(max), Some(x)) = (s["maximum"].as_f64(), n.as_f64()) {
                    ensure!(x <= max, "{at}: {x} above {max}");
                }
            }
            Value::Array(items) => {
                if let Some(n) = s["minItems"].as_u64() {
                    ensure!(items.len() as u64 >= n, "{at}: fewer than {n} items");
                }
                if let Some(n) = s["maxItems"].as_u64() {
                    ensure!(items.len() as u64 <= n, "{at}: more than {n} items");
                }
                if let Some(item) = s.get("items") {
                    for (i, x) in items.iter().enumerate() {
                        self.validate(item, x, &format!("{at}[{i}]"))?;
                    }
                }
            }
            Value::Object(fields) => {
                if let Some(req) = s["required"].as_array() {
                    for name in req.iter().filter_map(Value::as_str) {
                        ensure!(fields.contains_key(name), "{at}: missing {name}");
                    }
                }
                let props = s["properties"].as_object();
                for (k, x) in fields {
                    match props.and_then(|p| p.get(k)) {
                        Some(ps) => self.validate(ps, x, &format!("{at}.{k}"))?,
                        None => ensure!(
                            s.get("additionalProperties") != Some(&json!(false)),
                            "{at}: unexpected field {k}"
                        ),
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// One generated request.
struct Case {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    body: Option<Value>,
    /// Drop the credentials (an invalid case).
    anonymous: bool,
}

fn param_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(param_text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Breaks one rule the document states; `None` when the operation has nothing to break.
fn mutate(doc: &Doc, op: &Value, case: &mut Case, rng: &mut Rng) -> Option<String> {
    let body_schema = op
        .pointer("/requestBody/content/application~1json/schema")
        .map(|s| doc.resolve(s));
    let mut options: Vec<&str> = vec![];
    if op.get("security").is_some() {
        options.push("no_credentials");
    }
    if body_schema.is_some() {
        options.extend(["malformed_json", "not_an_object", "unknown_field"]);
    }
    if case.path.contains("/v1/")
        && op["parameters"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["in"] == "path"))
    {
        options.push("bad_path_id");
    }
    if op["parameters"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["schema"]["type"] == "integer"))
    {
        options.push("bad_integer");
    }
    let choice = *rng.pick(&options)?;
    match choice {
        "no_credentials" => case.anonymous = true,
        "malformed_json" => case.body = Some(Value::String("\u{0}{not json".into())),
        "not_an_object" => case.body = Some(json!([1, 2, 3])),
        "unknown_field" => {
            let mut b = case.body.take().unwrap_or_else(|| json!({}));
            // Bodies with a oneOf (create) are objects too.
            if let Some(o) = b.as_object_mut() {
                o.insert("no_such_field".into(), json!(1));
            }
            case.body = Some(b);
        }
        "bad_path_id" => {
            // A character no id pattern allows, in place of the last path segment's id.
            let mut segs: Vec<String> = case.path.split('/').map(str::to_string).collect();
            let last_id = segs.len()
                - 1
                - segs
                    .iter()
                    .rev()
                    .position(|s| s.contains('_') || s.contains('-') || s.len() > 20)
                    .unwrap_or(0);
            segs[last_id] = "bad%20id%21".into();
            case.path = segs.join("/");
        }
        "bad_integer" => {
            let p = op["parameters"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["schema"]["type"] == "integer"))?;
            let name = p["name"].as_str()?.to_string();
            case.query.retain(|(k, _)| *k != name);
            let bad = if rng.chance(50) {
                "abc".to_string()
            } else {
                "-5".to_string()
            };
            case.query.push((name, bad));
        }
        _ => return None,
    }
    Some(choice.to_string())
}

/// Generates a request for `op` valid by the document.
fn valid_case(doc: &Doc, path: &str, method: &str, op: &Value, pools: &Pools, rng: &mut Rng) -> Result<Case> {
    let params = op["parameters"].as_array().cloned().unwrap_or_default();
    // The conversation in the path first: cursors and message ids are of it.
    let mut cid = None;
    let mut filled = path.to_string();
    // Calls that take a cursor or message id of the conversation: one with messages.
    let text = op.to_string();
    let needs_messages = text.contains("schemas/Cursor") || text.contains("schemas/MessageId");
    for p in params.iter().filter(|p| p["in"] == "path") {
        let name = p["name"].as_str().context("name")?;
        let with_messages: Vec<&String> = pools
            .messages
            .iter()
            .filter(|(c, m)| {
                !m.is_empty() && (doc.format(&p["schema"]) != Some("group-id") || c.starts_with("g_"))
            })
            .map(|(c, _)| c)
            .collect();
        let v = match rng.pick(&with_messages) {
            Some(c) if name == "cid" && needs_messages => (*c).clone(),
            _ => param_text(&doc.generate(&p["schema"], pools, cid.as_deref(), rng)?),
        };
        if name == "cid" {
            cid = Some(v.clone());
        }
        filled = filled.replace(&format!("{{{name}}}"), &v);
    }
    let exclusive: Vec<Vec<String>> = op["x-mutually-exclusive-parameters"]
        .as_array()
        .map(|groups| {
            groups
                .iter()
                .map(|g| {
                    g.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut query = Vec::new();
    let mut headers = Vec::new();
    for p in params.iter().filter(|p| p["in"] != "path") {
        let name = p["name"].as_str().context("name")?.to_string();
        if name == "token" {
            continue;
        }
        let required = p["required"].as_bool().unwrap_or(false);
        if !required && rng.chance(50) {
            continue;
        }
        if exclusive
            .iter()
            .any(|g| g.contains(&name) && query.iter().any(|(k, _): &(String, String)| g.contains(k)))
        {
            continue;
        }
        let v = param_text(&doc.generate(&p["schema"], pools, cid.as_deref(), rng)?);
        match p["in"].as_str() {
            Some("query") => query.push((name, v)),
            Some("header") => headers.push((name, v)),
            _ => {}
        }
    }
    let body = match op.pointer("/requestBody/content/application~1json/schema") {
        Some(s) => Some(doc.generate(s, pools, cid.as_deref(), rng)?),
        None => None,
    };
    Ok(Case {
        method: Method::from_bytes(method.to_uppercase().as_bytes())?,
        path: filled,
        query,
        headers,
        body,
        anonymous: false,
    })
}

/// Sends `case` and checks the answer against the document; returns the status and body.
async fn send(
    doc: &Doc<'_>,
    r: &TestRegion,
    caller: &Session,
    op: &Value,
    case: &Case,
) -> Result<(u16, Value)> {
    let mut req = r
        .http
        .request(case.method.clone(), format!("{}{}", r.base, case.path))
        .query(&case.query);
    if !case.anonymous {
        req = match op["security"][0]
            .as_object()
            .and_then(|o| o.keys().next())
            .map(String::as_str)
        {
            Some("bearer") => req.bearer_auth(&caller.token),
            Some("adminKey") => req.header("X-Admin-Key", ADMIN_KEY),
            _ => req,
        };
    }
    for (k, v) in &case.headers {
        req = req.header(k, v);
    }
    if let Some(b) = &case.body {
        req = match b {
            Value::String(raw) if raw.starts_with('\u{0}') => req.body(raw.clone()),
            _ => req.json(b),
        };
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if content_type.starts_with("text/event-stream") {
        // A live feed never ends: its status and media type are what can be checked.
        ensure!(
            op["responses"][status.to_string()]["content"]["text/event-stream"].is_object(),
            "{status}: an undocumented event stream"
        );
        return Ok((status, Value::Null));
    }
    let bytes = resp.bytes().await?;
    ensure!(status < 500, "{status}: {}", String::from_utf8_lossy(&bytes));
    let documented = op["responses"].get(status.to_string()).with_context(|| {
        format!(
            "status {status} is not documented: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    let documented = doc.resolve(documented);
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        ensure!(
            bytes.is_empty(),
            "{status} documents no body, got {}",
            String::from_utf8_lossy(&bytes)
        );
        return Ok((status, Value::Null));
    };
    if let Some(schema) = content.get("application/json").map(|c| &c["schema"]) {
        ensure!(
            content_type.starts_with("application/json"),
            "{status}: content type {content_type}"
        );
        let body: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        doc.validate(schema, &body, "body")
            .with_context(|| format!("{status} answer {body} against {schema}"))?;
        return Ok((status, body));
    }
    Ok((status, Value::Null))
}

/// What one operation's cases came to.
#[derive(Default, Debug)]
struct Tally {
    valid: usize,
    valid_ok: usize,
    valid_400: Vec<String>,
    invalid: usize,
    invalid_accepted: usize,
}

/// Learns ids and cursors from answers, as the document's links say.
fn harvest(pools: &mut Pools, op_id: &str, case: &Case, body: &Value) {
    match op_id {
        "post_v1_conversations" => {
            if let Some(cid) = body["conversation_id"].as_str() {
                if !pools.conversations.iter().any(|c| c == cid) {
                    pools.conversations.push(cid.to_string());
                    if cid.starts_with("g_") {
                        pools.groups.push(cid.to_string());
                    }
                }
            }
        }
        "post_v1_conversations__cid__messages" => {
            let cid = case.path.split('/').nth(3).unwrap_or_default().to_string();
            if let (Some(m), Some(c)) = (body["message_id"].as_str(), body["cursor"].as_str()) {
                pools
                    .messages
                    .entry(cid)
                    .or_default()
                    .push((m.to_string(), c.to_string()));
            }
        }
        "get_v1_conversations" => {
            if let Some(c) = body["next_cursor"].as_str() {
                pools.list_cursors.push(c.to_string());
            }
        }
        "get_v1_search" => {
            if let Some(c) = body["next_cursor"].as_str() {
                pools.search_cursors.push(c.to_string());
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_fuzz_from_the_openapi_document() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d").await?;
    for u in ["bob", "carol", "dave"] {
        r.user(u, "d").await?;
    }
    let bob = r.session("bob", "d").await?;
    let mut pools = Pools {
        caller: "ann".into(),
        users: vec!["bob".into(), "carol".into(), "dave".into()],
        ..Default::default()
    };
    // Conversations and messages for the path ids (the fuzz run adds its own).
    let direct = ann.direct("bob").await?;
    let (st, g) = ann
        .post(
            "/v1/conversations",
            json!({"kind": "group", "name": "g", "members": ["bob", "carol"]}),
        )
        .await?;
    ensure!(st == 201, "{g}");
    let group = g["conversation_id"].as_str().context("id")?.to_string();
    for (cid, who) in [(&direct, &ann), (&direct, &bob), (&group, &ann), (&group, &bob)] {
        for i in 0..2 {
            let sent = who
                .send(cid, &format!("seed-{cid}-{}-{i}", who.user), "seed")
                .await?;
            pools.messages.entry(cid.clone()).or_default().push((
                sent["message_id"].as_str().context("id")?.to_string(),
                sent["cursor"].as_str().context("cursor")?.to_string(),
            ));
        }
    }
    pools.conversations = vec![direct.clone(), group.clone()];
    pools.groups = vec![group.clone()];
    // Every seeded message applied, so their cursors and ids name something.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    for cid in [&direct, &group] {
        loop {
            let (_, h) = ann
                .get(&format!("/v1/conversations/{cid}/messages?limit=10"))
                .await?;
            if h["messages"].as_array().is_some_and(|m| m.len() >= 4) {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "seed messages not applied: {h}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    // A search cursor: the seeded messages searchable (the index commits on its own
    // cadence), then a page of one.
    loop {
        let (_, found) = ann.get("/v1/search?q=seed&limit=1").await?;
        if let Some(c) = found["next_cursor"].as_str() {
            pools.search_cursors.push(c.to_string());
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "seed messages not searchable: {found}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, list) = ann.get("/v1/conversations?limit=1").await?;
    if let Some(c) = list["next_cursor"].as_str() {
        pools.list_cursors.push(c.to_string());
    }
    ensure!(pools.caller == ann.user);

    let (st, document) =
        meridian_e2e::answer(r.http.get(format!("{}/openapi.json", r.base)).send().await?).await?;
    ensure!(st == 200, "{document}");
    let doc = Doc { root: &document };
    let mut operations: Vec<(String, String, Value)> = Vec::new();
    for (path, item) in document["paths"].as_object().context("paths")? {
        for (method, op) in item.as_object().context("path item")? {
            operations.push((path.clone(), method.clone(), op.clone()));
        }
    }
    ensure!(operations.len() >= 28, "{} operations", operations.len());
    // Deletions last, so the conversations the others use stay.
    operations.sort_by_key(|(_, m, _)| m == "delete");

    let mut rng = Rng(SEED);
    let started = tokio::time::Instant::now();
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut cases = 0;
    for (path, method, op) in &operations {
        let op_id = op["operationId"].as_str().context("operationId")?.to_string();
        let tally = tallies.entry(op_id.clone()).or_default();
        for n in 0..VALID_CASES_PER_OPERATION + INVALID_CASES_PER_OPERATION {
            ensure!(
                started.elapsed() < RUN_LIMIT,
                "the fuzz run took longer than {RUN_LIMIT:?}"
            );
            let mut case = valid_case(&doc, path, method, op, &pools, &mut rng)?;
            let broken = if n >= VALID_CASES_PER_OPERATION {
                match mutate(&doc, op, &mut case, &mut rng) {
                    Some(b) => Some(b),
                    None => continue,
                }
            } else {
                None
            };
            cases += 1;
            let described = format!(
                "{op_id} {} {}?{:?} {:?} body {} ({})",
                case.method,
                case.path,
                case.query,
                case.headers,
                case.body.as_ref().map_or("none".into(), Value::to_string),
                broken.as_deref().unwrap_or("valid")
            );
            let (status, body) = match send(&doc, &r, &ann, op, &case).await {
                Ok(answer) => answer,
                Err(e) => {
                    failures.push(format!("{described}: {e:#}"));
                    continue;
                }
            };
            match broken {
                None => {
                    tally.valid += 1;
                    if status < 300 {
                        tally.valid_ok += 1;
                        harvest(&mut pools, &op_id, &case, &body);
                    }
                    if status == 400 {
                        tally.valid_400.push(format!("{described}: {body}"));
                    }
                }
                Some(_) => {
                    tally.invalid += 1;
                    if status < 300 {
                        tally.invalid_accepted += 1;
                    }
                }
            }
        }
    }
    let mut report = String::new();
    for (op, t) in &tallies {
        report.push_str(&format!(
            "{op}: valid {}/{} accepted, {} refused 400; invalid {} ({} accepted)\n",
            t.valid_ok,
            t.valid,
            t.valid_400.len(),
            t.invalid,
            t.invalid_accepted
        ));
    }
    println!("fuzz: {cases} cases in {:?}\n{report}", started.elapsed());
    if !failures.is_empty() {
        bail!(
            "{} of {cases} answers broke the document:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    ensure!((250..=600).contains(&cases), "{cases} cases");
    // A WebSocket cannot be opened by plain requests: its 400/426 is expected.
    let refused: Vec<&String> = tallies
        .iter()
        .filter(|(op, _)| op.as_str() != "get_v1_ws")
        .flat_map(|(_, t)| &t.valid_400)
        .collect();
    ensure!(
        refused.is_empty(),
        "requests valid by the document refused 400:\n{}",
        refused.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
    // Every request that breaks a stated rule is refused.
    let loose: Vec<String> = tallies
        .iter()
        .filter(|(_, t)| t.invalid_accepted > 0)
        .map(|(op, t)| format!("{op}: {} of {}", t.invalid_accepted, t.invalid))
        .collect();
    ensure!(
        loose.is_empty(),
        "requests that break the document were accepted: {loose:?}"
    );
    let (valid, ok) = tallies
        .values()
        .fold((0, 0), |(v, o), t| (v + t.valid, o + t.valid_ok));
    ensure!(
        ok * 2 >= valid,
        "only {ok} of {valid} valid requests were accepted:\n{report}"
    );
    r.stop().await
}
