//! A WAN link on purpose: delay, jitter, loss and cuts between regions.
//!
//! [`LinkProxy`] is a TCP proxy standing for one WAN link: it listens on `listen`, connects
//! each accepted connection to `upstream`, and forwards bytes both ways, late. This machine's
//! kernel has no netem qdisc and no iptables, so `meridian up --wan-delay` puts one of these
//! between each region's nats-server and the hub, and the drills cut them for partitions.
//!
//! ```no_run
//! # async fn demo() -> Result<(), meridian_chaos::LinkError> {
//! use std::time::Duration;
//! use meridian_chaos::{LinkConfig, LinkProxy};
//! let mut cfg = LinkConfig::new("127.0.0.1:0".parse().unwrap(), "127.0.0.1:7902".parse().unwrap());
//! cfg.delay = Duration::from_millis(20);
//! let proxy = LinkProxy::bind(cfg).await?;
//! let (addr, link) = (proxy.local_addr(), proxy.handle());
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let task = tokio::spawn(proxy.run(shutdown.clone()));
//! link.cut(); // a partition: connections through `addr` die, new ones are refused
//! link.heal();
//! shutdown.cancel();
//! task.await.unwrap();
//! # let _ = addr; Ok(()) }
//! ```
//!
//! # What the link does to bytes
//! - **Delay**: every chunk read on one side is written to the other no earlier than `delay`
//!   after it was read, in each direction (a round trip through the proxy costs `2 * delay`).
//! - **Jitter**: each chunk gets an extra delay drawn uniformly from `0..=jitter`, so `delay`
//!   is the floor and `delay + jitter / 2` the mean. A chunk is never written before the one
//!   read ahead of it: a late chunk holds back those behind it, which is what TCP's in-order
//!   delivery does to the segments behind a late one (head-of-line blocking). Bytes arrive
//!   intact and in order per direction, whatever the jitter.
//! - **Loss**: a TCP stream cannot lose bytes; a lost segment costs the time until the sender
//!   retransmits it, at least one retransmission timeout (Linux's floor is 200 ms), and
//!   everything behind it waits as well. So with probability `loss` a chunk is held back an
//!   extra `retransmit_delay` (200 ms by default), and, by the ordering rule above, so is
//!   what follows it. A chunk is what one `read` returned (up to 16 KiB), not a segment, so
//!   `loss` is per chunk: the right order of magnitude, not a packet-level simulation.
//!
//! # Changing the shape while it runs
//! [`LinkHandle::set_shape`] changes delay, jitter and loss of a running link (a slow-link
//! drill turns them up and back down). Each chunk reads the shape when it is read, so the
//! new shape applies to every chunk read after the call, on open connections too; chunks
//! already waiting keep their due time, and a chunk is still never written ahead of the one
//! before it (so lowering the delay lets the queue drain in order, not overtake).
//!
//! # What a cut looks like
//! [`LinkHandle::cut`]: every connection through the link is reset (RST on both sides; bytes
//! inside the proxy are discarded), and new connections are accepted and reset at once, which
//! the connecting side sees as a refused connection. [`LinkHandle::heal`] lets new
//! connections through again; the reset ones stay gone, as they would on a real network.
//!
//! A real cut is silent: no FIN, no RST, and connect attempts time out. A silent cut would be
//! found by nats-server only through its own PINGs (`ping_interval` 2 min and 2 missed
//! PINGs by default), so a drill would measure nats-server's ping timer instead of the
//! partition, and a black-holed reconnect would hang in nats-server's handshake until its own
//! timeout, making the heal time depend on that too. What nats-server does next is the same
//! either way: it drops the leafnode connection (the mirror's `active` age starts growing,
//! the real signal of a cut link, since a cut mirror keeps reporting lag 0) and retries the
//! remote every reconnect interval (1 s) until one attempt gets through. Resets give that
//! outcome at once and deterministically, so a healed link is back within a reconnect
//! interval.
//!
//! # Resources
//! [`LinkProxy::run`] owns every task (one per connection, both directions in it) and ends
//! them on shutdown. Each direction buffers at most `IN_FLIGHT_CHUNKS` chunks of
//! `CHUNK_BYTES` (1 MiB); past that the proxy stops reading, and TCP flow control pushes
//! back on the sender, as a full link would. At most `MAX_CONNECTIONS` connections are open
//! at once; more are reset.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The extra delay of a lost chunk by default: Linux's minimum TCP retransmission timeout.
pub const DEFAULT_RETRANSMIT_DELAY: Duration = Duration::from_millis(200);
/// The most one `read` takes from a socket: one chunk.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks one direction holds while they wait out their delay.
const IN_FLIGHT_CHUNKS: usize = 64;
/// Connections open at once through one link.
const MAX_CONNECTIONS: usize = 1024;
/// How long connecting to the upstream may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// One link: where it listens, where it leads, and what it does to the bytes (see the crate
/// docs). Delays apply to each direction separately.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Where the proxy listens; port 0 picks a free one ([`LinkProxy::local_addr`]).
    pub listen: SocketAddr,
    /// Where each accepted connection is forwarded.
    pub upstream: SocketAddr,
    /// One-way delay, the floor of every chunk's delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..=jitter` per chunk.
    pub jitter: Duration,
    /// Probability (0.0..=1.0) that a chunk is "lost": held back `retransmit_delay` more.
    pub loss: f64,
    /// What a lost chunk costs, standing for one TCP retransmission timeout.
    pub retransmit_delay: Duration,
}

impl LinkConfig {
    /// A link without delay, jitter or loss; set the fields for those.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> LinkConfig {
        LinkConfig {
            listen,
            upstream,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            retransmit_delay: DEFAULT_RETRANSMIT_DELAY,
        }
    }

    pub fn validate(&self) -> Result<(), LinkError> {
        self.shape().validate()?;
        check_duration("retransmit_delay", self.retransmit_delay)
    }

    /// The delay, jitter and loss the link starts with.
    pub fn shape(&self) -> LinkShape {
        LinkShape {
            delay: self.delay,
            jitter: self.jitter,
            loss: self.loss,
        }
    }
}

/// What a link does to its chunks; changeable while it runs ([`LinkHandle::set_shape`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkShape {
    /// One-way delay, the floor of every chunk's delay.
    pub delay: Duration,
    /// Extra one-way delay, uniform in `0..=jitter` per chunk.
    pub jitter: Duration,
    /// Probability (0.0..=1.0) that a chunk is "lost": held back `retransmit_delay` more.
    pub loss: f64,
}

impl LinkShape {
    pub fn validate(&self) -> Result<(), LinkError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(LinkError::Invalid {
                field: "loss",
                reason: format!("{} is not a probability in 0.0..=1.0", self.loss),
            });
        }
        check_duration("delay", self.delay)?;
        check_duration("jitter", self.jitter)
    }

    /// When a chunk read at `now` may be written, ignoring the chunks ahead of it.
    fn due(&self, now: Instant, retransmit_delay: Duration, rng: &mut StdRng) -> Instant {
        let mut due = now + self.delay;
        if !self.jitter.is_zero() {
            due += self.jitter.mul_f64(rng.gen_range(0.0..=1.0));
        }
        if self.loss > 0.0 && rng.gen_bool(self.loss) {
            due += retransmit_delay;
        }
        due
    }
}

/// Far beyond any WAN; also keeps `Instant + delay` from overflowing.
fn check_duration(field: &'static str, d: Duration) -> Result<(), LinkError> {
    let day = Duration::from_secs(24 * 3600);
    if d > day {
        return Err(LinkError::Invalid {
            field,
            reason: format!("{d:?} is more than a day"),
        });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link config {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Controls a running [`LinkProxy`]; cheap to clone, usable from any task.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    cut: Arc<watch::Sender<bool>>,
    /// Read once per chunk by every direction of every connection.
    shape: Arc<watch::Sender<LinkShape>>,
    open: Arc<AtomicUsize>,
}

impl LinkHandle {
    /// Cuts the link: resets every connection through it, and every new one until
    /// [`heal`](Self::heal).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets new connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Changes delay, jitter and loss for every chunk read after this call, on open
    /// connections and new ones alike (see the module docs). An invalid shape is refused
    /// and the link keeps its old one.
    pub fn set_shape(&self, delay: Duration, jitter: Duration, loss: f64) -> Result<(), LinkError> {
        let shape = LinkShape { delay, jitter, loss };
        shape.validate()?;
        self.shape.send_replace(shape);
        Ok(())
    }

    /// The delay, jitter and loss chunks read now get.
    pub fn shape(&self) -> LinkShape {
        *self.shape.borrow()
    }

    /// Connections currently forwarded (accepted and connected upstream, not yet closed).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A bound link; [`run`](Self::run) forwards until shutdown.
pub struct LinkProxy {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// Where to dial, and what a lost chunk costs; the shape lives in the handle.
    config: Arc<LinkConfig>,
    handle: LinkHandle,
}

impl LinkProxy {
    /// Validates `config` and binds its listen address (so the port is known, and taken,
    /// before anything dials it).
    pub async fn bind(config: LinkConfig) -> Result<LinkProxy, LinkError> {
        config.validate()?;
        let bind_err = |source| LinkError::Bind {
            addr: config.listen,
            source,
        };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let shape = config.shape();
        Ok(LinkProxy {
            listener,
            local_addr,
            config: Arc::new(config),
            handle: LinkHandle {
                cut: Arc::new(watch::Sender::new(false)),
                shape: Arc::new(watch::Sender::new(shape)),
                open: Arc::new(AtomicUsize::new(0)),
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> LinkHandle {
        self.handle.clone()
    }

    /// Accepts and forwards until `shutdown`, then closes every connection and returns once
    /// their tasks have ended.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut connections = JoinSet::new();
        let stop = shutdown.child_token();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((client, _)) => {
                        if self.handle.is_cut() || connections.len() >= MAX_CONNECTIONS {
                            reset(client);
                            continue;
                        }
                        connections.spawn(forward(
                            client,
                            self.config.clone(),
                            self.handle.clone(),
                            stop.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(listen = %self.local_addr, error = %e, "link proxy cannot accept");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        stop.cancel();
        while connections.join_next().await.is_some() {}
    }
}

/// Closes `stream` with a RST rather than a FIN: the connection died, it was not ended.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the link is cut.
async fn cut_happens(mut cut: watch::Receiver<bool>) {
    // The sender lives in every handle and in the proxy itself, so it outlives the
    // connections; were it gone, no cut could come.
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One connection: dials the upstream, then forwards both ways until both sides have
/// closed, an error, a cut (both reset) or shutdown.
async fn forward(mut client: TcpStream, config: Arc<LinkConfig>, link: LinkHandle, stop: CancellationToken) {
    let cut = link.cut.subscribe();
    let dial = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(config.upstream));
    let mut upstream = tokio::select! {
        _ = stop.cancelled() => return,
        _ = cut_happens(cut.clone()) => return reset(client),
        dialled = dial => match dialled {
            Ok(Ok(s)) => s,
            // The far end is down: the client sees its connection die, as it would.
            Ok(Err(e)) => {
                tracing::debug!(upstream = %config.upstream, error = %e, "link proxy cannot reach upstream");
                return reset(client);
            }
            Err(_) => return reset(client),
        },
    };
    link.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(link.open.clone());
    // Latency is what this proxy adds on purpose; Nagle would add its own.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let was_cut = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both_ways = async {
            tokio::try_join!(
                pump(client_read, upstream_write, &link, config.retransmit_delay),
                pump(upstream_read, client_write, &link, config.retransmit_delay),
            )
        };
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = cut_happens(cut.clone()) => true,
            _ = both_ways => false,
        }
    };
    if was_cut {
        reset(client);
        reset(upstream);
    }
}

/// Forwards `from` to `to`, each chunk at its due time and never ahead of the chunk read
/// before it, with the link's shape as it is when the chunk is read. On end of input it
/// finishes the queued chunks and half-closes `to`.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    link: &LinkHandle,
    retransmit_delay: Duration,
) -> io::Result<()> {
    let (queue, mut due_chunks) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT_CHUNKS);
    let read = async move {
        let mut rng = StdRng::from_entropy();
        let mut last_due = Instant::now();
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            chunk.truncate(n);
            // Monotone due times keep the chunks in order (head-of-line blocking).
            let shape = link.shape();
            let due = shape
                .due(Instant::now(), retransmit_delay, &mut rng)
                .max(last_due);
            last_due = due;
            if queue.send((due, chunk)).await.is_err() {
                // The writer failed; its error ends the connection.
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = due_chunks.recv().await {
            tokio::time::sleep_until(due).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port, run until the returned token is cancelled.
    async fn echo_server() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    Ok((mut s, _)) = listener.accept() => {
                        conns.spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                }
            }
        });
        (addr, stop)
    }

    struct Running {
        addr: SocketAddr,
        link: LinkHandle,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        _echo: CancellationToken,
    }

    async fn proxy_to_echo(configure: impl FnOnce(&mut LinkConfig)) -> Running {
        let (echo, echo_stop) = echo_server().await;
        let mut cfg = LinkConfig::new("127.0.0.1:0".parse().unwrap(), echo);
        configure(&mut cfg);
        let proxy = LinkProxy::bind(cfg).await.unwrap();
        let shutdown = CancellationToken::new();
        Running {
            addr: proxy.local_addr(),
            link: proxy.handle(),
            task: tokio::spawn(proxy.run(shutdown.clone())),
            shutdown,
            _echo: echo_stop,
        }
    }

    /// A bound on every wait, so a broken proxy fails the test instead of hanging it.
    const PATIENCE: Duration = Duration::from_secs(10);

    async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(payload).await?;
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no echo"))??;
        Ok(back)
    }

    /// Whether the connection has died (EOF or reset), waiting at most `PATIENCE`.
    async fn is_dead(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    #[tokio::test]
    async fn delay_is_added_in_each_direction() {
        let delay = Duration::from_millis(60);
        let p = proxy_to_echo(|c| c.delay = delay).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        for i in 0..3u8 {
            let started = std::time::Instant::now();
            assert_eq!(round_trip(&mut s, &[i]).await.unwrap(), vec![i]);
            let rtt = started.elapsed();
            // Lower bound only: the machine may always be slower than asked.
            assert!(
                rtt >= 2 * delay,
                "round trip {rtt:?} under twice the one-way delay {delay:?}"
            );
        }
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn loss_costs_at_least_the_retransmit_delay() {
        let rto = Duration::from_millis(80);
        let p = proxy_to_echo(|c| {
            c.loss = 1.0;
            c.retransmit_delay = rto;
        })
        .await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let started = std::time::Instant::now();
        round_trip(&mut s, b"x").await.unwrap();
        let rtt = started.elapsed();
        assert!(
            rtt >= 2 * rto,
            "every chunk lost both ways, yet the round trip took {rtt:?}"
        );
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn bytes_arrive_intact_and_in_order_under_jitter_and_loss() {
        let p = proxy_to_echo(|c| {
            c.delay = Duration::from_millis(1);
            c.jitter = Duration::from_millis(15);
            c.loss = 0.05;
            c.retransmit_delay = Duration::from_millis(10);
        })
        .await;
        let s = TcpStream::connect(p.addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        // Many small writes, so there are many chunks for the jitter to try to reorder.
        let sent: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            for piece in to_send.chunks(997) {
                w.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            w.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut received))
            .await
            .expect("the echo ends within the bound")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(received.len(), sent.len());
        let first_difference = received.iter().zip(&sent).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "bytes reordered or corrupted");
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn cut_resets_connections_and_refuses_new_ones_until_healed() {
        let p = proxy_to_echo(|c| c.delay = Duration::from_millis(5)).await;
        let mut before = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(round_trip(&mut before, b"up").await.unwrap(), b"up");
        assert_eq!(p.link.open_connections(), 1);

        p.link.cut();
        assert!(p.link.is_cut());
        assert!(is_dead(&mut before).await, "a connection outlived the cut");
        // A new connection completes the handshake (the listener is ours) and dies at once.
        if let Ok(mut during) = TcpStream::connect(p.addr).await {
            let _ = during.write_all(b"anyone?").await;
            assert!(is_dead(&mut during).await, "a connection went through a cut link");
        }
        let deadline = Instant::now() + PATIENCE;
        while p.link.open_connections() != 0 {
            assert!(Instant::now() < deadline, "connections still open after the cut");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        p.link.heal();
        let mut after = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(round_trip(&mut after, b"back").await.unwrap(), b"back");
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_every_connection() {
        let p = proxy_to_echo(|c| c.delay = Duration::from_millis(1)).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        round_trip(&mut s, b"hi").await.unwrap();
        p.shutdown.cancel();
        tokio::time::timeout(PATIENCE, p.task)
            .await
            .expect("run returns after shutdown")
            .unwrap();
        assert!(is_dead(&mut s).await);
        assert_eq!(p.link.open_connections(), 0);
    }

    #[tokio::test]
    async fn set_shape_applies_to_chunks_read_after_it_on_an_open_connection() {
        let p = proxy_to_echo(|_| {}).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        assert_eq!(round_trip(&mut s, b"fast").await.unwrap(), b"fast");
        assert_eq!(p.link.shape().delay, Duration::ZERO);

        let delay = Duration::from_millis(80);
        let jitter = Duration::from_millis(3);
        p.link.set_shape(delay, jitter, 0.25).unwrap();
        assert_eq!(
            p.link.shape(),
            LinkShape {
                delay,
                jitter,
                loss: 0.25
            }
        );
        // The connection opened before the change gets the new delay, both ways.
        for i in 0..3u8 {
            let started = std::time::Instant::now();
            assert_eq!(round_trip(&mut s, &[i]).await.unwrap(), vec![i]);
            let rtt = started.elapsed();
            assert!(
                rtt >= 2 * delay,
                "round trip {rtt:?} after raising the delay to {delay:?}"
            );
        }
        // So does a new one.
        let mut fresh = TcpStream::connect(p.addr).await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut fresh, b"new").await.unwrap(), b"new");
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());

        // Back to nothing: bytes still arrive intact.
        p.link.set_shape(Duration::ZERO, Duration::ZERO, 0.0).unwrap();
        assert_eq!(round_trip(&mut s, b"again").await.unwrap(), b"again");
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_shape_is_refused_and_the_old_one_kept() {
        let p = proxy_to_echo(|c| c.delay = Duration::from_millis(5)).await;
        let before = p.link.shape();
        let err = p
            .link
            .set_shape(Duration::ZERO, Duration::ZERO, -0.1)
            .expect_err("loss below 0")
            .to_string();
        assert!(err.contains("loss"), "{err}");
        let err = p
            .link
            .set_shape(Duration::from_secs(2 * 24 * 3600), Duration::ZERO, 0.0)
            .expect_err("two days of delay")
            .to_string();
        assert!(err.contains("delay"), "{err}");
        assert_eq!(p.link.shape(), before);
        p.shutdown.cancel();
        p.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_bad_config_is_refused_naming_the_field() {
        let mut cfg = LinkConfig::new("127.0.0.1:0".parse().unwrap(), "127.0.0.1:1".parse().unwrap());
        cfg.loss = 1.5;
        let err = LinkProxy::bind(cfg).await.err().expect("refused").to_string();
        assert!(err.contains("loss"), "{err}");
    }
}
