//! The operator control API of `meridian up` (the module docs of `up` list the calls): the
//! drills' hands on a running deployment. It talks to the supervisors through one bounded
//! command channel each, because only a supervisor may signal its children: it holds each
//! child unreaped, so the pid it signals cannot have been reused by another process. What
//! the supervisors run is published back through a status each, so reading the state never
//! waits on a supervisor busy restarting something.

use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use meridian_chaos::LinkHandle;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::*;

/// The env override the region process reads its clock offset from (`gateway.clock_offset_ms`).
pub(super) const CLOCK_OFFSET_ENV: &str = "MERIDIAN__GATEWAY__CLOCK_OFFSET_MS";
/// Commands queued per supervisor; a caller beyond that waits for room.
const COMMAND_QUEUE: usize = 16;
/// How long a call waits for its supervisor, which may be waiting for a restarted
/// nats-server to accept connections (up to `NATS_READY_TIMEOUT`).
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the launcher waits for the control server to finish its calls at shutdown.
pub(super) const CONTROL_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A signal the control API sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sig {
    Kill,
    Term,
    Stop,
    Cont,
}

impl Sig {
    /// `KILL` or `SIGKILL`, and so on.
    fn parse(text: &str) -> Option<Sig> {
        match text.strip_prefix("SIG").unwrap_or(text) {
            "KILL" => Some(Sig::Kill),
            "TERM" => Some(Sig::Term),
            "STOP" => Some(Sig::Stop),
            "CONT" => Some(Sig::Cont),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sig::Kill => "KILL",
            Sig::Term => "TERM",
            Sig::Stop => "STOP",
            Sig::Cont => "CONT",
        }
    }

    fn number(self) -> libc::c_int {
        match self {
            Sig::Kill => libc::SIGKILL,
            Sig::Term => libc::SIGTERM,
            Sig::Stop => libc::SIGSTOP,
            Sig::Cont => libc::SIGCONT,
        }
    }
}

/// Sends `sig` to the process in `slot`, which its supervisor holds unreaped (so its pid is
/// still its own). `None`: no process, or it has exited (its supervisor sees that next).
pub(super) fn signal_proc(slot: &mut Option<Proc>, sig: Sig) -> Option<u32> {
    let p = slot.as_mut()?;
    // try_wait reaps an exited child; its status stays with it for the supervisor's wait.
    if !matches!(p.child.try_wait(), Ok(None)) {
        return None;
    }
    // SAFETY: kill(2) with the pid of a child we hold unreaped and a valid signal number.
    if unsafe { libc::kill(p.pid as libc::pid_t, sig.number()) } != 0 {
        return None;
    }
    match sig {
        Sig::Stop => p.stopped = true,
        Sig::Cont => p.stopped = false,
        Sig::Kill | Sig::Term => {}
    }
    tracing::warn!(owner = %p.owner, what = p.what, pid = p.pid, signal = sig.name(), "signalled by the control API");
    Some(p.pid)
}

/// A signal for one process; the answer is its pid, `None` when nothing runs.
pub(super) struct SignalRequest {
    pub(super) sig: Sig,
    pub(super) reply: oneshot::Sender<Option<u32>>,
}

/// Which process of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Which {
    Nats,
    Region,
}

/// What the control API asks of a region's supervisor.
pub(super) enum RegionCommand {
    Signal(Which, SignalRequest),
    /// Held: restart nothing of the region. Released: restart what is down, nats first.
    Hold {
        hold: bool,
        reply: oneshot::Sender<()>,
    },
    /// Keep this offset for every later start of the region process and restart it now
    /// (SIGTERM); the answer is the pid asked to stop, `None` when none ran.
    ClockOffset {
        offset_ms: i64,
        reply: oneshot::Sender<Option<u32>>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProcState {
    Running,
    /// SIGSTOPped through the control API.
    Stopped,
    /// Not running: exited, waiting for its restart, or held.
    Down,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub(super) struct ProcStatus {
    pub(super) pid: Option<u32>,
    pub(super) state: ProcState,
}

impl ProcStatus {
    pub(super) fn of(slot: &Option<Proc>) -> ProcStatus {
        match slot {
            None => ProcStatus {
                pid: None,
                state: ProcState::Down,
            },
            Some(p) => ProcStatus {
                pid: Some(p.pid),
                state: if p.stopped {
                    ProcState::Stopped
                } else {
                    ProcState::Running
                },
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub(super) struct RegionStatus {
    pub(super) nats: ProcStatus,
    pub(super) region: ProcStatus,
    pub(super) held: bool,
    pub(super) clock_offset_ms: i64,
}

impl RegionStatus {
    pub(super) fn of(r: &RegionProcs) -> RegionStatus {
        RegionStatus {
            nats: ProcStatus::of(&r.nats),
            region: ProcStatus::of(&r.region),
            held: r.held,
            clock_offset_ms: r.clock_offset_ms,
        }
    }
}

/// A supervisor's end of the control API: commands in, its status out.
pub(super) struct Supervised<S, C> {
    pub(super) commands: mpsc::Receiver<C>,
    status: Arc<Mutex<S>>,
}

impl<S, C> Supervised<S, C> {
    /// What GET /control shows from now on.
    pub(super) fn publish(&self, status: S) {
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }
}

/// The control API's end of one supervisor.
pub(super) struct Controlled<S, C> {
    commands: mpsc::Sender<C>,
    status: Arc<Mutex<S>>,
}

impl<S: Clone, C> Controlled<S, C> {
    fn status(&self) -> S {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sends the command `make` builds around a reply channel, and waits for the answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> C) -> Result<T, ControlError> {
        let (reply, answer) = oneshot::channel();
        let gone = || {
            ControlError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the launcher is stopping",
            )
        };
        let asked = async {
            self.commands.send(make(reply)).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())
        };
        tokio::time::timeout(REPLY_TIMEOUT, asked).await.map_err(|_| {
            ControlError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "supervisor_busy",
                format!("the supervisor did not answer within {REPLY_TIMEOUT:?}; retry"),
            )
        })?
    }
}

pub(super) fn control_channel<S, C>(initial: S) -> (Controlled<S, C>, Supervised<S, C>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let status = Arc::new(Mutex::new(initial));
    (
        Controlled {
            commands: tx,
            status: status.clone(),
        },
        Supervised { commands: rx, status },
    )
}

pub(super) type RegionControl = Controlled<RegionStatus, RegionCommand>;
pub(super) type RegionSupervised = Supervised<RegionStatus, RegionCommand>;
pub(super) type HubControl = Controlled<ProcStatus, SignalRequest>;
pub(super) type HubSupervised = Supervised<ProcStatus, SignalRequest>;

/// One region as the control API reaches it.
pub(super) struct ControlledRegion {
    pub(super) plan: Arc<RegionPlan>,
    pub(super) supervisor: RegionControl,
    /// Its WAN link proxy to the hub (two or more regions).
    pub(super) link: Option<LinkHandle>,
}

pub(super) struct ControlState {
    pub(super) admin_key: String,
    pub(super) regions: BTreeMap<String, ControlledRegion>,
    pub(super) hub: Option<HubControl>,
}

/// Serves the control API on `listener` until `shutdown`.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    state: ControlState,
    shutdown: CancellationToken,
) {
    let app = router(Arc::new(state));
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "the control API stopped");
    }
}

fn router(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/control", get(status))
        .route("/control/signal", post(signal))
        .route("/control/hold", post(hold))
        .route("/control/links/{region}", put(link))
        .route("/control/clock/{region}", put(clock))
        .fallback(|| async { ControlError::new(StatusCode::NOT_FOUND, "not_found", "no such control call") })
        .method_not_allowed_fallback(|| async {
            ControlError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this control call takes another method",
            )
        })
        // On every path, so an unknown one does not answer differently to strangers.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ))
        .with_state(state)
}

/// `{"error", "message"}` with a 4xx (or 503 while the launcher cannot answer).
#[derive(Debug)]
pub(super) struct ControlError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ControlError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ControlError {
        ControlError {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> ControlError {
        ControlError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn unknown(target: &str) -> ControlError {
        ControlError::new(
            StatusCode::NOT_FOUND,
            "unknown_target",
            format!("{target:?} is not a target of this deployment"),
        )
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

async fn require_admin_key(State(state): State<Arc<ControlState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !meridian_gateway::auth::admin_key_matches(&state.admin_key, given) {
        return ControlError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "X-Admin-Key is missing or wrong (the deployment's admin key)",
        )
        .into_response();
    }
    next.run(req).await
}

/// A JSON body of type `T`; anything else is a 400 naming what is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| ControlError::invalid(format!("body: {e}")))
}

impl ControlState {
    fn region(&self, name: &str) -> Result<&ControlledRegion, ControlError> {
        self.regions.get(name).ok_or_else(|| ControlError::unknown(name))
    }
}

/// A link's shape as the API shows it: this region's link to the hub, one way.
fn link_json(link: &LinkHandle) -> serde_json::Value {
    let shape = link.shape();
    json!({
        "delay_ms": u64::try_from(shape.delay.as_millis()).unwrap_or(u64::MAX),
        "jitter_ms": u64::try_from(shape.jitter.as_millis()).unwrap_or(u64::MAX),
        "loss": shape.loss,
        "cut": link.is_cut(),
    })
}

async fn status(State(state): State<Arc<ControlState>>) -> Json<serde_json::Value> {
    let regions: serde_json::Map<String, serde_json::Value> = state
        .regions
        .iter()
        .map(|(name, r)| {
            let s = r.supervisor.status();
            let entry = json!({
                "nats": s.nats,
                "region": s.region,
                "held": s.held,
                "clock_offset_ms": s.clock_offset_ms,
                "link": r.link.as_ref().map(link_json),
            });
            (name.clone(), entry)
        })
        .collect();
    let hub = state.hub.as_ref().map(|h| h.status());
    Json(json!({"regions": regions, "hub": hub}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    target: String,
    signal: String,
}

async fn signal(
    State(state): State<Arc<ControlState>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ControlError> {
    let req: SignalBody = parse_body(&body)?;
    let sig = Sig::parse(&req.signal).ok_or_else(|| {
        ControlError::invalid(format!(
            "signal {:?} is not one of KILL, TERM, STOP, CONT",
            req.signal
        ))
    })?;
    let pid = if req.target == HUB {
        let hub = state
            .hub
            .as_ref()
            .ok_or_else(|| ControlError::unknown(&req.target))?;
        hub.ask(|reply| SignalRequest { sig, reply }).await?
    } else {
        let (region, which) = match req.target.split_once('/') {
            Some((r, "nats")) => (r, Which::Nats),
            Some((r, "region")) => (r, Which::Region),
            _ => return Err(ControlError::unknown(&req.target)),
        };
        let r = state
            .regions
            .get(region)
            .ok_or_else(|| ControlError::unknown(&req.target))?;
        r.supervisor
            .ask(|reply| RegionCommand::Signal(which, SignalRequest { sig, reply }))
            .await?
    };
    let pid = pid.ok_or_else(|| {
        ControlError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!("{} has no running process (down, restarting or held)", req.target),
        )
    })?;
    Ok(Json(
        json!({"target": req.target, "signal": sig.name(), "pid": pid}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    region: String,
    hold: bool,
}

async fn hold(
    State(state): State<Arc<ControlState>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ControlError> {
    let req: HoldBody = parse_body(&body)?;
    let r = state.region(&req.region)?;
    let hold = req.hold;
    r.supervisor
        .ask(|reply| RegionCommand::Hold { hold, reply })
        .await?;
    Ok(Json(json!({"region": req.region, "held": hold})))
}

/// Every field optional: what is missing stays as it is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    delay_ms: Option<u64>,
    jitter_ms: Option<u64>,
    loss: Option<f64>,
    cut: Option<bool>,
}

async fn link(
    State(state): State<Arc<ControlState>>,
    UrlPath(region): UrlPath<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ControlError> {
    let r = state.region(&region)?;
    let link = r.link.as_ref().ok_or_else(|| {
        ControlError::new(
            StatusCode::NOT_FOUND,
            "unknown_target",
            format!("region {region} has no WAN link (a lone region has no hub)"),
        )
    })?;
    let req: LinkBody = parse_body(&body)?;
    let old = link.shape();
    link.set_shape(
        req.delay_ms.map_or(old.delay, Duration::from_millis),
        req.jitter_ms.map_or(old.jitter, Duration::from_millis),
        req.loss.unwrap_or(old.loss),
    )
    .map_err(|e| ControlError::invalid(e.to_string()))?;
    match req.cut {
        Some(true) => link.cut(),
        Some(false) => link.heal(),
        None => {}
    }
    tracing::warn!(%region, shape = ?link.shape(), cut = link.is_cut(), "WAN link changed by the control API");
    Ok(Json(link_json(link)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    offset_ms: i64,
}

async fn clock(
    State(state): State<Arc<ControlState>>,
    UrlPath(region): UrlPath<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ControlError> {
    let r = state.region(&region)?;
    let req: ClockBody = parse_body(&body)?;
    // The region file decides what offset is acceptable: a region process refusing its
    // configuration would otherwise crash-loop.
    let env = [(CLOCK_OFFSET_ENV.to_string(), req.offset_ms.to_string())];
    RegionConfig::load(&r.plan.region_toml(), env).map_err(|e| ControlError::invalid(e.to_string()))?;
    let offset_ms = req.offset_ms;
    let restarting = r
        .supervisor
        .ask(|reply| RegionCommand::ClockOffset { offset_ms, reply })
        .await?;
    Ok(Json(json!({
        "region": region,
        "clock_offset_ms": offset_ms,
        "restarting_pid": restarting,
    })))
}

/// The offset the region processes start with: the launcher's own
/// `MERIDIAN__GATEWAY__CLOCK_OFFSET_MS`, as they would have inherited it, else 0.
pub(super) fn inherited_clock_offset() -> i64 {
    match std::env::var(CLOCK_OFFSET_ENV) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(value = %text, "{CLOCK_OFFSET_ENV} is not an integer; regions start with offset 0");
            0
        }),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_with_or_without_their_prefix() {
        assert_eq!(Sig::parse("KILL"), Some(Sig::Kill));
        assert_eq!(Sig::parse("SIGSTOP"), Some(Sig::Stop));
        assert_eq!(Sig::parse("kill"), None);
        assert_eq!(Sig::parse("HUP"), None);
        for s in [Sig::Kill, Sig::Term, Sig::Stop, Sig::Cont] {
            assert_eq!(Sig::parse(s.name()), Some(s));
        }
    }
}
