//! A tokio driver: runs one [`Membership`] machine over any [`Transport`].
//!
//! [`start`] spawns two tasks: one receives frames from the transport and hands them over a
//! channel (so no transport future is ever cancelled half-way), the other owns the machine and
//! does what its driving contract asks: it feeds decoded [`Envelope::Swim`] frames and timer
//! expiries to the machine with tokio's clock (so a paused test clock drives it), encodes and
//! sends what the machine wants sent, publishes the membership as a watchable view and every
//! change as an event.
//!
//! The task that owns the machine never waits on a peer: it hands each encoded message to a
//! bounded queue per destination ([`SEND_QUEUE_CAPACITY`] frames) with a non-blocking
//! `try_send`, and a sender task per destination drains its queue into
//! [`Transport::send_unreliable`]. A destination whose sends hang (a crashed host that drops
//! connection attempts keeps a dialling transport waiting up to its connect timeout) fills its
//! own queue, whose further messages are dropped and counted
//! ([`DriverStats::send_dropped`]); probes and gossip to everyone else go on. A sender task
//! idle for [`SENDER_IDLE`] exits, so destinations that left cost nothing.
//!
//! Membership uses its own transport endpoint (as memberlist uses its own port): every frame
//! that arrives on it must be a [`Envelope::Swim`]; anything else, or anything that does not
//! decode, is dropped, counted in [`DriverStats::rejected_frames`] and logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::Keyring;
use crate::envelope::Envelope;
use crate::membership::{
    AuthStats, Member, Membership, MembershipEvent, MembershipStats, SwimFrame,
};
use bytes::Bytes;

use crate::identity::Address;
use crate::transport::{Incoming, Transport, TransportError};
use crate::wire::{self, Header};

/// Events buffered per subscriber; a subscriber that falls further behind skips events (and
/// can re-read the whole view).
pub const EVENT_CAPACITY: usize = 1024;

/// Frames queued per destination; a message to a destination whose queue is full is dropped
/// and counted in [`DriverStats::send_dropped`] (SWIM tolerates loss).
pub const SEND_QUEUE_CAPACITY: usize = 64;

/// A destination's sender task exits after this long without a message to send.
pub const SENDER_IDLE: Duration = Duration::from_secs(30);

/// Destinations with a sender task at most; past it, messages to new destinations are dropped
/// and counted until idle ones exit.
pub const MAX_DESTINATIONS: usize = 16 * 1024;

/// How long a leave waits for the queued messages (its announcement among them) to go out
/// before the transport closes.
const LEAVE_FLUSH: Duration = Duration::from_secs(1);

/// How long the receive task pauses after a transport error other than `Closed`.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Counters of a running driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriverStats {
    /// Membership messages received and handed to the machine.
    pub received: u64,
    /// Frames dropped because they did not decode or were not membership messages.
    pub rejected_frames: u64,
    /// Messages sent.
    pub sent: u64,
    /// Messages the transport refused (unreachable peer, full queue, ...) or that did not
    /// encode.
    pub send_errors: u64,
    /// Messages dropped before reaching the transport: their destination's queue was full
    /// (its sends are slow or hang) or [`MAX_DESTINATIONS`] had sender tasks.
    pub send_dropped: u64,
    /// Destinations with a sender task now.
    pub destinations: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    rejected_frames: AtomicU64,
    sent: AtomicU64,
    send_errors: AtomicU64,
    send_dropped: AtomicU64,
    destinations: AtomicU64,
    auth: std::sync::Mutex<AuthStats>,
    protocol: std::sync::Mutex<MembershipStats>,
}

enum Command {
    SetKeyring(Keyring, oneshot::Sender<()>),
    SetMeta(crate::membership::MemberMeta, oneshot::Sender<bool>),
    Leave(Duration, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A handle to a running membership driver. Cheap to clone; the driver runs until
/// [`MembershipHandle::leave`] or [`MembershipHandle::shutdown`], or until the transport closes.
#[derive(Clone, Debug)]
pub struct MembershipHandle {
    view: watch::Receiver<Arc<[Member]>>,
    events: broadcast::Sender<MembershipEvent>,
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::SetKeyring(..) => "SetKeyring",
            Command::SetMeta(..) => "SetMeta",
            Command::Leave(..) => "Leave",
            Command::Shutdown(_) => "Shutdown",
        })
    }
}

impl MembershipHandle {
    /// The membership as this node sees it (itself first, then every other member it knows,
    /// by id), updated after every change.
    pub fn view(&self) -> watch::Receiver<Arc<[Member]>> {
        self.view.clone()
    }

    /// The current membership.
    pub fn members(&self) -> Arc<[Member]> {
        self.view.borrow().clone()
    }

    /// Every membership change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<MembershipEvent> {
        self.events.subscribe()
    }

    /// Counters.
    pub fn stats(&self) -> DriverStats {
        DriverStats {
            received: self.counters.received.load(Ordering::Relaxed),
            rejected_frames: self.counters.rejected_frames.load(Ordering::Relaxed),
            sent: self.counters.sent.load(Ordering::Relaxed),
            send_errors: self.counters.send_errors.load(Ordering::Relaxed),
            send_dropped: self.counters.send_dropped.load(Ordering::Relaxed),
            destinations: self.counters.destinations.load(Ordering::Relaxed),
        }
    }

    /// Counters of authentication (messages verified and refused per kind), as of the
    /// machine's last input.
    pub fn auth_stats(&self) -> AuthStats {
        *self
            .counters
            .auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counters of the protocol (probes, suspicions, refusals and rate limits), as of the
    /// machine's last input.
    pub fn membership_stats(&self) -> MembershipStats {
        *self
            .counters
            .protocol
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the machine's keyring (see [`Membership::set_keyring`]): keys added are
    /// admitted at once, members whose key is gone are removed from the view. Returns once
    /// the machine has it.
    pub async fn set_keyring(&self, keyring: Keyring) {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::SetKeyring(keyring, tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Publishes new metadata for this node ([`Membership::set_meta`]); `false` if the
    /// machine refused it (invalid, leaving) or the driver has stopped.
    pub async fn set_meta(&self, meta: crate::membership::MemberMeta) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::SetMeta(meta, tx))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Leaves gracefully: announces the departure, keeps gossiping for `grace` so the news
    /// gets out, then stops and closes the transport. Returns once stopped.
    pub async fn leave(&self, grace: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(grace, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops at once, without telling anyone (to the cluster it looks like a crash), and
    /// closes the transport. Returns once stopped.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Runs `machine` over `transport` on the current tokio runtime. The machine's own address
/// (its [`crate::membership::MemberMeta::addr`]) should be the transport's local address.
pub fn start<T: Transport>(transport: T, machine: Membership) -> MembershipHandle {
    let transport = Arc::new(transport);
    let counters = Arc::new(Counters::default());
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOX_CAPACITY);
    tokio::spawn(receive(transport.clone(), inbound_tx, counters.clone()));
    spawn_run(transport, machine, inbound_rx, counters, true)
}

/// Runs `machine` on a transport that something else receives from (the node's one endpoint
/// carries membership and data): that receiver hands membership messages over with
/// [`SwimInbox::deliver`]. The driver sends on `transport` but does not close it when it
/// stops; its owner does.
pub fn start_shared<T: Transport>(
    transport: Arc<T>,
    machine: Membership,
) -> (MembershipHandle, SwimInbox) {
    let counters = Arc::new(Counters::default());
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOX_CAPACITY);
    let inbox = SwimInbox {
        tx: inbound_tx,
        counters: counters.clone(),
    };
    (
        spawn_run(transport, machine, inbound_rx, counters, false),
        inbox,
    )
}

/// Membership messages waiting for the machine; more are dropped and counted (SWIM tolerates
/// loss, and a machine this far behind is better off with fresh input).
const INBOX_CAPACITY: usize = 1024;

/// Where a shared endpoint's receiver hands membership messages to a driver started with
/// [`start_shared`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SwimInbox {
    tx: mpsc::Sender<(Address, SwimFrame)>,
    counters: Arc<Counters>,
}

impl SwimInbox {
    /// Hands `message` from `from` to the machine without waiting; drops and counts it
    /// ([`DriverStats::rejected_frames`]) if the machine is that far behind or stopped.
    pub fn deliver(&self, from: Address, message: SwimFrame) {
        if self.tx.try_send((from, message)).is_err() {
            self.counters
                .rejected_frames
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn spawn_run<T: Transport>(
    transport: Arc<T>,
    mut machine: Membership,
    inbound: mpsc::Receiver<(Address, SwimFrame)>,
    counters: Arc<Counters>,
    close_transport: bool,
) -> MembershipHandle {
    machine.limit_message_len(transport.max_frame_len());
    let (view_tx, view_rx) = watch::channel(snapshot(&machine));
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let (commands, command_rx) = mpsc::channel(4);
    tokio::spawn(run(
        transport,
        machine,
        Channels {
            inbound,
            commands: command_rx,
            view: view_tx,
            events: events.clone(),
        },
        counters.clone(),
        close_transport,
    ));
    MembershipHandle {
        view: view_rx,
        events,
        commands,
        counters,
    }
}

struct Channels {
    inbound: mpsc::Receiver<(Address, SwimFrame)>,
    commands: mpsc::Receiver<Command>,
    view: watch::Sender<Arc<[Member]>>,
    events: broadcast::Sender<MembershipEvent>,
}

fn snapshot(machine: &Membership) -> Arc<[Member]> {
    std::iter::once(machine.local().clone())
        .chain(machine.members().cloned())
        .collect()
}

/// Receives frames from the membership endpoint and hands the decoded membership messages to
/// the machine's task; anything else, or anything that does not decode, is dropped and counted.
async fn receive<T: Transport>(
    transport: Arc<T>,
    tx: mpsc::Sender<(Address, SwimFrame)>,
    counters: Arc<Counters>,
) {
    let max_frame = transport.max_frame_len();
    loop {
        let incoming: Incoming = match transport.recv().await {
            Ok(incoming) => incoming,
            Err(TransportError::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "membership transport receive error");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        match wire::decode::<Envelope>(&incoming.frame, max_frame) {
            Ok((_, envelope)) if envelope.is_swim() => {
                let Ok(frame) = envelope.into_swim() else {
                    continue;
                };
                if tx.send((incoming.from, frame)).await.is_err() {
                    return;
                }
            }
            Ok(_) => {
                counters.rejected_frames.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(from = %incoming.from, "non-membership message on the membership endpoint");
            }
            Err(e) => {
                counters.rejected_frames.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(from = %incoming.from, error = %e, "membership frame rejected");
            }
        }
    }
}

/// The per-destination queues and their sender tasks.
struct Outbox<T> {
    transport: Arc<T>,
    queues: HashMap<Address, mpsc::Sender<Bytes>>,
    tasks: tokio::task::JoinSet<()>,
    counters: Arc<Counters>,
}

impl<T: Transport> Outbox<T> {
    fn new(transport: Arc<T>, counters: Arc<Counters>) -> Self {
        Outbox {
            transport,
            queues: HashMap::new(),
            tasks: tokio::task::JoinSet::new(),
            counters,
        }
    }

    /// Queues `frame` for `to` without waiting; drops and counts it if `to`'s queue is full.
    fn send(&mut self, to: Address, frame: Bytes) {
        let frame = match self.queues.get(&to) {
            None => frame,
            Some(queue) => match queue.try_send(frame) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.drop_one(&to, "send queue full");
                    return;
                }
                // Its sender task exited idle: start another.
                Err(mpsc::error::TrySendError::Closed(frame)) => {
                    self.queues.remove(&to);
                    frame
                }
            },
        };
        if self.queues.len() >= MAX_DESTINATIONS {
            self.queues.retain(|_, q| !q.is_closed());
            if self.queues.len() >= MAX_DESTINATIONS {
                self.drop_one(&to, "too many destinations");
                return;
            }
        }
        // Reap sender tasks that exited idle: a JoinSet keeps every finished task until it is
        // joined, and destinations come and go (one per accepted connection a peer dials from).
        while self.tasks.try_join_next().is_some() {}
        let (tx, rx) = mpsc::channel(SEND_QUEUE_CAPACITY);
        // A fresh queue has room.
        let _ = tx.try_send(frame);
        self.queues.insert(to.clone(), tx);
        self.counters.destinations.fetch_add(1, Ordering::Relaxed);
        self.tasks
            .spawn(drain(self.transport.clone(), to, rx, self.counters.clone()));
    }

    fn drop_one(&self, to: &Address, why: &'static str) {
        self.counters.send_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(%to, why, "membership message dropped");
    }

    /// Closes every queue and waits up to `flush` for what is queued to go out; sender tasks
    /// still busy after that (a hung destination) are aborted.
    async fn close(mut self, flush: Duration) {
        self.queues.clear();
        let tasks = &mut self.tasks;
        let _ =
            tokio::time::timeout(flush, async { while tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
    }
}

/// One destination's sender task: sends what is queued for `to`, in order, until the queue
/// closes or stays empty for [`SENDER_IDLE`].
async fn drain<T: Transport>(
    transport: Arc<T>,
    to: Address,
    mut rx: mpsc::Receiver<Bytes>,
    counters: Arc<Counters>,
) {
    // Counts the destination out however the task ends, aborted at close included.
    let _live = DestinationGuard(counters.clone());
    loop {
        let frame = match tokio::time::timeout(SENDER_IDLE, rx.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                // Idle: refuse new frames, then send any that slipped in meanwhile.
                rx.close();
                while let Ok(frame) = rx.try_recv() {
                    send_one(&*transport, &to, frame, &counters).await;
                }
                break;
            }
        };
        send_one(&*transport, &to, frame, &counters).await;
    }
}

/// Decrements [`Counters::destinations`] when a sender task ends, however it ends.
struct DestinationGuard(Arc<Counters>);

impl Drop for DestinationGuard {
    fn drop(&mut self) {
        self.0.destinations.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn send_one<T: Transport>(transport: &T, to: &Address, frame: Bytes, counters: &Counters) {
    // SWIM tolerates loss (it was made for UDP): a transport with unreliable delivery (QUIC
    // datagrams) sends small messages that way.
    match transport.send_unreliable(to, frame).await {
        Ok(()) => {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            counters.send_errors.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%to, error = %e, "membership send failed");
        }
    }
}

async fn run<T: Transport>(
    transport: Arc<T>,
    mut machine: Membership,
    mut ch: Channels,
    counters: Arc<Counters>,
    close_transport: bool,
) {
    let max_frame = transport.max_frame_len();
    let mut outbox = Outbox::new(transport.clone(), counters.clone());
    let mut leaving_until: Option<(Instant, oneshot::Sender<()>)> = None;
    let mut stopped: Option<oneshot::Sender<()>> = None;
    let mut leaving = false;
    loop {
        // Effects of the last input.
        let mut changed = false;
        while let Some(t) = machine.poll_frame() {
            match wire::encode(Header::message(), &Envelope::from(t.frame), max_frame) {
                Ok(frame) => outbox.send(t.to, frame),
                Err(e) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(to = %t.to, error = %e, "membership message does not encode");
                }
            }
        }
        let auth = machine.auth_stats();
        {
            let mut shared = counters
                .auth
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *shared != auth {
                *shared = auth;
            }
        }
        let protocol = machine.stats();
        {
            let mut shared = counters
                .protocol
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *shared != protocol {
                *shared = protocol;
            }
        }
        while let Some(event) = machine.poll_event() {
            changed = true;
            // No subscriber is fine.
            let _ = ch.events.send(event);
        }
        if changed || ch.view.borrow().first().map(|m| m.life) != Some(machine.local().life) {
            ch.view.send_replace(snapshot(&machine));
        }
        if let Some((until, _)) = &leaving_until
            && Instant::now() >= *until
        {
            stopped = leaving_until.take().map(|(_, tx)| tx);
            leaving = true;
            break;
        }
        let mut deadline = machine
            .poll_timeout()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if let Some((until, _)) = &leaving_until {
            deadline = deadline.min(*until);
        }
        tokio::select! {
            incoming = ch.inbound.recv() => {
                let Some((from, message)) = incoming else { break };
                counters.received.fetch_add(1, Ordering::Relaxed);
                machine.handle_frame(Instant::now().into_std(), from, message);
            }
            () = tokio::time::sleep_until(deadline) => {
                machine.handle_timeout(Instant::now().into_std());
            }
            command = ch.commands.recv() => match command {
                Some(Command::SetKeyring(keyring, tx)) => {
                    machine.set_keyring(Instant::now().into_std(), keyring);
                    // A revoked member that was already dead leaves the view without an event.
                    ch.view.send_replace(snapshot(&machine));
                    let _ = tx.send(());
                }
                Some(Command::SetMeta(meta, tx)) => {
                    let published = machine.set_meta(Instant::now().into_std(), meta);
                    ch.view.send_replace(snapshot(&machine));
                    let _ = tx.send(published);
                }
                Some(Command::Leave(grace, tx)) => {
                    machine.leave(Instant::now().into_std());
                    leaving_until = Some((Instant::now() + grace, tx));
                }
                Some(Command::Shutdown(tx)) => {
                    stopped = Some(tx);
                    break;
                }
                None => break,
            },
        }
    }
    // A leave flushes its announcement; a shutdown looks like a crash and sends nothing more.
    let flush = if leaving { LEAVE_FLUSH } else { Duration::ZERO };
    outbox.close(flush).await;
    if close_transport {
        transport.close().await;
    }
    if let Some(tx) = stopped {
        let _ = tx.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::inproc::InProcessNetwork;

    /// Sender tasks that went idle are reaped, not kept until close: destinations come and
    /// go for as long as a node runs (one per connection a peer dials from).
    #[tokio::test(start_paused = true)]
    async fn idle_sender_tasks_are_reaped_not_kept() {
        let net = InProcessNetwork::new(11);
        let transport = Arc::new(net.bind("me").expect("bind"));
        let counters = Arc::new(Counters::default());
        let mut outbox = Outbox::new(transport, Arc::clone(&counters));
        for i in 0..50 {
            let _peer = net.bind(format!("peer-{i}")).expect("bind");
            outbox.send(Address::new(format!("peer-{i}")), Bytes::from_static(b"x"));
        }
        assert_eq!(outbox.tasks.len(), 50);
        // Every sender goes idle and exits.
        tokio::time::sleep(SENDER_IDLE + Duration::from_secs(1)).await;
        assert_eq!(counters.destinations.load(Ordering::Relaxed), 0);
        let _late = net.bind("late").expect("bind");
        outbox.send(Address::new("late"), Bytes::from_static(b"x"));
        assert_eq!(outbox.tasks.len(), 1, "finished sender tasks were kept");
        outbox.close(Duration::from_secs(1)).await;
        assert_eq!(counters.destinations.load(Ordering::Relaxed), 0);
    }
}
