//! How stages talk: [`Transport`], and [`InProcess`], stages as threads of
//! one process joined by bounded channels.
//!
//! A stage sends a micro-batch's hidden states to the next stage and the
//! last stage sends each micro-batch's picked tokens back to the others;
//! every message carries its micro-batch and step, so a receiver checks it
//! got what the schedule says comes next. A stage that fails says so to
//! every peer ([`Transport::abort`]), and any send or receive a peer has
//! pending, or starts later, fails at once with [`Error::StageStopped`]
//! naming the failed stage: nobody waits on a stage that will never send.

use std::sync::Arc;

use crossbeam_channel::{bounded, select, Receiver, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// What a message holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A micro-batch's hidden states after a stage's layers,
    /// `rows × hidden` f32 (rows batch-major).
    Hidden(Vec<f32>),
    /// The tokens the last stage picked for each sequence of a micro-batch.
    Tokens(Vec<u32>),
}

/// One message between stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The micro-batch (GPU batch) of the block.
    pub batch: usize,
    /// The generation step (0: the prefill).
    pub step: usize,
    pub payload: Payload,
}

/// One stage's end of the links to the others.
///
/// `send` may buffer (the schedule never has more than a block's
/// micro-batches in flight on one link, and an implementation must take
/// that many without blocking); `recv` waits for the next message from a
/// peer. Both fail promptly, with [`Error::StageStopped`], once any peer
/// aborted or went away.
pub trait Transport: Send {
    /// This stage's index.
    fn stage(&self) -> usize;

    /// Stages in the pipeline.
    fn stages(&self) -> usize;

    /// Sends `message` to stage `to`.
    fn send(&mut self, to: usize, message: Message) -> Result<()>;

    /// The next message from stage `from`.
    fn recv(&mut self, from: usize) -> Result<Message>;

    /// Fails, as a receive would, once a peer aborted or went away (checked
    /// between layers, so a stage stops within one layer of a failure).
    fn poll(&mut self) -> Result<()> {
        Ok(())
    }

    /// This stage failed (`reason`): every peer's pending and later sends
    /// and receives fail. Only the first abort of a pipeline is recorded.
    fn abort(&mut self, reason: &str);

    /// This stage is done and sends nothing more; dropping an endpoint
    /// that did not finish aborts.
    fn finish(&mut self);
}

/// What the stages of one in-process pipeline share: the first failure,
/// and a channel that is closed when it is recorded (every `select` on it
/// wakes at once).
struct Shared {
    failure: Mutex<Option<(usize, String)>>,
    alarm: Mutex<Option<Sender<()>>>,
}

impl Shared {
    fn fail(&self, stage: usize, reason: &str) {
        {
            let mut failure = self.failure.lock();
            if failure.is_none() {
                *failure = Some((stage, reason.to_string()));
            }
        }
        // Dropping the only sender wakes every receiver of the alarm.
        self.alarm.lock().take();
    }

    fn stopped(&self) -> Error {
        match &*self.failure.lock() {
            Some((stage, reason)) => Error::StageStopped { stage: *stage, reason: reason.clone() },
            None => Error::Pipeline("the pipeline stopped without a recorded failure".into()),
        }
    }
}

/// A stage of an in-process pipeline: bounded channels to and from every
/// other stage, and the pipeline's alarm.
pub struct InProcess {
    stage: usize,
    stages: usize,
    /// `to[s]`: the channel to stage `s` (none to itself).
    to: Vec<Option<Sender<Message>>>,
    /// `from[s]`: the channel from stage `s`.
    from: Vec<Option<Receiver<Message>>>,
    alarm: Receiver<()>,
    shared: Arc<Shared>,
    finished: bool,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("stage", &self.stage).field("stages", &self.stages).finish()
    }
}

impl InProcess {
    /// The endpoints of `stages` stages (endpoint `s` for stage `s`), every
    /// pair linked by a channel of `capacity` messages each way. The
    /// schedule needs a capacity of at least the block's micro-batches (as
    /// many may be in flight on one link; fewer could leave two stages each
    /// waiting for the other to take a message).
    pub fn mesh(stages: usize, capacity: usize) -> Vec<InProcess> {
        let (alarm_tx, alarm_rx) = bounded::<()>(0);
        let shared = Arc::new(Shared { failure: Mutex::new(None), alarm: Mutex::new(Some(alarm_tx)) });
        let mut to: Vec<Vec<Option<Sender<Message>>>> = (0..stages).map(|_| vec![None; stages]).collect();
        let mut from: Vec<Vec<Option<Receiver<Message>>>> = (0..stages).map(|_| vec![None; stages]).collect();
        for a in 0..stages {
            for b in 0..stages {
                if a != b {
                    let (tx, rx) = bounded(capacity.max(1));
                    to[a][b] = Some(tx);
                    from[b][a] = Some(rx);
                }
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(stage, (to, from))| InProcess {
                stage,
                stages,
                to,
                from,
                alarm: alarm_rx.clone(),
                shared: Arc::clone(&shared),
                finished: false,
            })
            .collect()
    }

    fn no_link(&self, peer: usize) -> Error {
        Error::Pipeline(format!("stage {} has no link with stage {peer} of {}", self.stage, self.stages))
    }

    fn gone(&self, peer: usize) -> Error {
        // A peer that recorded why it stopped says so; otherwise it ended
        // without a word (its thread unwound or returned early).
        match &*self.shared.failure.lock() {
            Some((stage, reason)) => Error::StageStopped { stage: *stage, reason: reason.clone() },
            None => Error::StageStopped { stage: peer, reason: "it ended without finishing".into() },
        }
    }
}

impl Transport for InProcess {
    fn stage(&self) -> usize {
        self.stage
    }

    fn stages(&self) -> usize {
        self.stages
    }

    fn send(&mut self, to: usize, message: Message) -> Result<()> {
        let tx = self.to.get(to).and_then(Option::as_ref).ok_or_else(|| self.no_link(to))?;
        // The alarm's channel never carries a value: it only closes.
        select! {
            send(tx, message) -> sent => sent.map_err(|_| self.gone(to)),
            recv(self.alarm) -> _ => Err(self.shared.stopped()),
        }
    }

    fn recv(&mut self, from: usize) -> Result<Message> {
        let rx = self.from.get(from).and_then(Option::as_ref).ok_or_else(|| self.no_link(from))?;
        // A message already here is taken even after an alarm: the
        // schedule then stops at its own next wait.
        if let Ok(m) = rx.try_recv() {
            return Ok(m);
        }
        select! {
            recv(rx) -> m => m.map_err(|_| self.gone(from)),
            recv(self.alarm) -> _ => Err(self.shared.stopped()),
        }
    }

    fn poll(&mut self) -> Result<()> {
        match self.alarm.try_recv() {
            Err(crossbeam_channel::TryRecvError::Empty) => Ok(()),
            _ => Err(self.shared.stopped()),
        }
    }

    fn abort(&mut self, reason: &str) {
        self.shared.fail(self.stage, reason);
    }

    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.fail(self.stage, "it ended without finishing");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn hidden(batch: usize, step: usize) -> Message {
        Message { batch, step, payload: Payload::Hidden(vec![batch as f32; 4]) }
    }

    #[test]
    fn messages_arrive_in_order_on_each_link() {
        let mut mesh = InProcess::mesh(3, 2);
        let (mut a, mut c) = (mesh.remove(0), mesh.remove(1));
        a.send(2, hidden(0, 0)).unwrap();
        a.send(2, hidden(1, 0)).unwrap();
        c.send(0, Message { batch: 0, step: 0, payload: Payload::Tokens(vec![7]) }).unwrap();
        assert_eq!(c.recv(0).unwrap(), hidden(0, 0));
        assert_eq!(c.recv(0).unwrap(), hidden(1, 0));
        assert_eq!(a.recv(2).unwrap().payload, Payload::Tokens(vec![7]));
        assert!(a.send(0, hidden(0, 0)).is_err(), "no link to itself");
        assert!(a.recv(5).is_err());
        for mut e in [a, c].into_iter().chain(mesh) {
            e.finish();
        }
    }

    #[test]
    fn an_abort_wakes_every_waiting_peer_at_once() {
        let mut mesh = InProcess::mesh(3, 1);
        let mut failing = mesh.remove(1);
        let start = Instant::now();
        std::thread::scope(|s| {
            let waiting: Vec<_> = mesh
                .iter_mut()
                .map(|e| {
                    s.spawn(move || {
                        // Stage 0 waits on stage 2 and stage 2 on stage 0:
                        // only the alarm of stage 1 can wake them.
                        let peer = if e.stage() == 0 { 2 } else { 0 };
                        e.recv(peer)
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            failing.abort("out of memory at layer 3");
            for w in waiting {
                let err = w.join().unwrap().unwrap_err().to_string();
                assert!(err.contains("stage 1") && err.contains("out of memory at layer 3"), "{err}");
            }
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        // A send to a full link fails too, rather than block.
        mesh[0].send(2, hidden(0, 0)).unwrap_err();
        failing.finish();
        mesh.iter_mut().for_each(Transport::finish);
    }

    #[test]
    fn a_peer_that_goes_away_unfinished_stops_the_others() {
        let mut mesh = InProcess::mesh(2, 1);
        let dead = mesh.remove(0);
        let mut alive = mesh.remove(0);
        let waiter = std::thread::spawn(move || {
            let e = alive.recv(0);
            alive.finish();
            e
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(dead);
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("stage 0") && err.contains("ended without finishing"), "{err}");
    }
}
