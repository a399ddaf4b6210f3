//! A tokio driver: runs one [`Membership`] machine over any [`Transport`].
//!
//! [`start`] spawns two tasks: one receives frames from the transport and hands them over a
//! channel (so no transport future is ever cancelled half-way), the other owns the machine and
//! does what its driving contract asks: it feeds decoded [`Envelope::Swim`] frames and timer
//! expiries to the machine with tokio's clock (so a paused test clock drives it), encodes and
//! sends what the machine wants sent, publishes the membership as a watchable view and every
//! change as an event.
//!
//! Membership uses its own transport endpoint (as memberlist uses its own port): every frame
//! that arrives on it must be a [`Envelope::Swim`]; anything else, or anything that does not
//! decode, is dropped, counted in [`DriverStats::rejected_frames`] and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::envelope::Envelope;
use crate::membership::{Member, Membership, MembershipEvent};
use crate::transport::{Incoming, Transport, TransportError};
use crate::wire::{self, Header};

/// Events buffered per subscriber; a subscriber that falls further behind skips events (and
/// can re-read the whole view).
pub const EVENT_CAPACITY: usize = 1024;

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
    /// Messages the transport refused (unreachable peer, full queue, ...).
    pub send_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    rejected_frames: AtomicU64,
    sent: AtomicU64,
    send_errors: AtomicU64,
}

enum Command {
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
        }
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
    let (view_tx, view_rx) = watch::channel(snapshot(&machine));
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let (commands, command_rx) = mpsc::channel(4);
    let (inbound_tx, inbound_rx) = mpsc::channel(1024);
    tokio::spawn(receive(transport.clone(), inbound_tx));
    tokio::spawn(run(
        transport,
        machine,
        Channels {
            inbound: inbound_rx,
            commands: command_rx,
            view: view_tx,
            events: events.clone(),
        },
        counters.clone(),
    ));
    MembershipHandle {
        view: view_rx,
        events,
        commands,
        counters,
    }
}

struct Channels {
    inbound: mpsc::Receiver<Incoming>,
    commands: mpsc::Receiver<Command>,
    view: watch::Sender<Arc<[Member]>>,
    events: broadcast::Sender<MembershipEvent>,
}

fn snapshot(machine: &Membership) -> Arc<[Member]> {
    std::iter::once(machine.local().clone())
        .chain(machine.members().cloned())
        .collect()
}

async fn receive<T: Transport>(transport: Arc<T>, tx: mpsc::Sender<Incoming>) {
    loop {
        match transport.recv().await {
            Ok(incoming) => {
                if tx.send(incoming).await.is_err() {
                    return;
                }
            }
            Err(TransportError::Closed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "membership transport receive error");
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn run<T: Transport>(
    transport: Arc<T>,
    mut machine: Membership,
    mut ch: Channels,
    counters: Arc<Counters>,
) {
    let max_frame = transport.max_frame_len();
    let mut leaving_until: Option<(Instant, oneshot::Sender<()>)> = None;
    let mut stopped: Option<oneshot::Sender<()>> = None;
    loop {
        // Effects of the last input.
        let mut changed = false;
        while let Some(t) = machine.poll_transmit() {
            match wire::encode(Header::message(), &Envelope::Swim(t.message), max_frame) {
                // SWIM tolerates loss (it was made for UDP): a transport with unreliable
                // delivery (QUIC datagrams) sends small messages that way.
                Ok(frame) => match transport.send_unreliable(&t.to, frame).await {
                    Ok(()) => {
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.send_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(to = %t.to, error = %e, "membership send failed");
                    }
                },
                Err(e) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(to = %t.to, error = %e, "membership message does not encode");
                }
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
                let Some(incoming) = incoming else { break };
                match wire::decode::<Envelope>(&incoming.frame, max_frame) {
                    Ok((_, Envelope::Swim(message))) => {
                        counters.received.fetch_add(1, Ordering::Relaxed);
                        machine.handle_message(Instant::now().into_std(), incoming.from, message);
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
            () = tokio::time::sleep_until(deadline) => {
                machine.handle_timeout(Instant::now().into_std());
            }
            command = ch.commands.recv() => match command {
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
    transport.close().await;
    if let Some(tx) = stopped {
        let _ = tx.send(());
    }
}
