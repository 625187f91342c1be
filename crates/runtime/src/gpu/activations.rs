//! Hidden states off the GPU, for any family: `--percent _ _ _ _ A_GPU
//! A_CPU` with `A_GPU` 0 puts each batch's hidden states between layers
//! in host memory (`A_CPU` 100) or on disk in `--offload-dir` (`A_CPU` 0):
//! FlexGen's third placement.
//!
//! A batch's hidden states are a list of parts ([`ActPart`]: per row,
//! `width` values of a type): the f32 residual stream, and where a family
//! keeps one, a 16-bit copy that is its blocks' input. Each batch has a
//! home on the tier ([`ActivationHome`], one 1-D tensor per part, sized for
//! the batch's largest step, its first), and the block's batches share two
//! GPU buffers ([`ActivationStreamer`]: each one a set of parts for the
//! largest step, made by the family so that its kernels get their own
//! typed buffers, [`ActBuffers`]).
//!
//! A use of a batch's hidden states ([`ActivationStreamer::run`]: its
//! embedding, a layer, its logits) takes the next buffer in turn. Before
//! the family's closure computes on it: the buffer's previous contents go
//! home once the compute that wrote them has finished (its event), and the
//! batch's rows of this step come from its home (unless the use writes
//! them all, as the embedding does). After: an event on the compute stream,
//! and the buffer's contents marked as the batch's newest, to be stored
//! when the buffer is next used. The buffers alternate, so while batch `k`
//! computes on one, the host stores batch `k − 1`'s states from the other
//! and loads batch `k + 1`'s into it: the loads and stores overlap the
//! compute as the KV cache's do ([`super::cache`]). A home is never loaded
//! while its newest values wait in a buffer: they are stored first (a block
//! of one batch, whose every use is the previous one's home, runs without
//! overlap). Copies go through the run's copy matrix (DMA or the pinned
//! relay for host memory, the staged disk path for the disk) and move only
//! the step's rows.
//!
//! GPU memory: two buffers of the largest step's rows of every part, where
//! a synchronous load and store would need one (see
//! [`ActivationStreamer::gpu_bytes`]).
//!
//! The runtime moves the bytes; the family computes: the closure gets the
//! buffer, the family's own type.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ops::gpu::buffer::{DevBuf, DevElem};
use ops::gpu::{Event, Gpu};
use tier_api::{CopyMatrix, DType, Device, HostMemKind, Shape, Tensor};
use tier_disk::DiskDevice;
use tier_host::HostDevice;

use super::{gpu_err, tier_err};
use crate::error::{Error, Result};
use crate::policy::Policy;

/// One part of a batch's hidden states: per row, `width` values of
/// `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActPart {
    pub dtype: DType,
    pub width: usize,
}

impl ActPart {
    /// Elements of `rows` rows, checked.
    pub fn elems(&self, rows: usize) -> Result<usize> {
        rows.checked_mul(self.width)
            .ok_or_else(|| gpu_err(format!("hidden states of {rows} rows × {} overflow", self.width)))
    }

    /// Bytes of `rows` rows, checked.
    pub fn bytes(&self, rows: usize) -> Result<u64> {
        self.elems(rows)?
            .checked_mul(self.dtype.size())
            .map(|b| b as u64)
            .ok_or_else(|| gpu_err(format!("hidden states of {rows} rows × {} overflow", self.width)))
    }
}

/// Bytes of `rows` rows of every part, checked.
pub fn parts_bytes(parts: &[ActPart], rows: usize) -> Result<u64> {
    parts.iter().try_fold(0u64, |sum, p| {
        sum.checked_add(p.bytes(rows)?).ok_or_else(|| gpu_err(format!("hidden states of {rows} rows overflow")))
    })
}

/// The tier the hidden states live on between layers: pageable host memory
/// (each step's states are written once and read once a layer; the GPU's
/// copies go through the pinned relay) or the disk, and the copy matrix:
/// all the run's ([`crate::Tiers`]).
#[derive(Clone)]
pub struct ActivationTier {
    pub host: Option<Arc<HostDevice>>,
    pub disk: Option<Arc<DiskDevice>>,
    matrix: Arc<CopyMatrix>,
}

impl std::fmt::Debug for ActivationTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationTier")
            .field("host", &self.host.is_some())
            .field("disk", &self.disk.is_some())
            .finish_non_exhaustive()
    }
}

/// Homes made so far (each home's identity, for the streamer's book of
/// which buffer holds whose newest values).
static HOMES: AtomicU64 = AtomicU64::new(0);

impl ActivationTier {
    /// Pageable host memory, or with `disk_dir` the disk tier there, from
    /// `tiers`.
    pub fn new(tiers: &crate::Tiers, disk_dir: Option<&Path>) -> Result<Self> {
        let (host, disk) = match disk_dir {
            Some(dir) => (None, Some(tiers.disk(dir)?)),
            None => (Some(tiers.host(HostMemKind::Pageable)?), None),
        };
        Ok(ActivationTier { host, disk, matrix: tiers.matrix()? })
    }

    /// The tier `policy`'s activation shares name: `None` with them on the
    /// GPU; host memory (`0 100`); the disk in `offload_dir` (`0 0`). A
    /// split over tiers is refused, saying what runs: a GPU engine keeps
    /// each batch's hidden states whole on one tier.
    pub fn of_policy(tiers: &crate::Tiers, policy: &Policy, offload_dir: &Path) -> Result<Option<Self>> {
        let (gpu, cpu) = (policy.act_gpu_percent, policy.act_cpu_percent);
        let disk = policy.disk_percents()[2];
        if gpu >= 100.0 {
            Ok(None)
        } else if cpu >= 100.0 {
            Ok(Some(Self::new(tiers, None)?))
        } else if disk >= 100.0 {
            Ok(Some(Self::new(tiers, Some(offload_dir))?))
        } else {
            Err(Error::InvalidArgument(format!(
                "--percent: the activations split {gpu}% GPU, {cpu}% CPU, {disk}% disk; the GPU engine keeps each \
                 batch's hidden states whole on one tier: give the activation shares 100 0 (GPU), 0 100 (host \
                 memory) or 0 0 (disk, in --offload-dir)"
            )))
        }
    }

    /// Whether the hidden states live on disk.
    pub fn on_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// The run's copy matrix.
    pub fn matrix(&self) -> &Arc<CopyMatrix> {
        &self.matrix
    }

    fn device(&self) -> Result<&dyn Device> {
        match (&self.host, &self.disk) {
            (Some(h), _) => Ok(h.as_ref()),
            (_, Some(d)) => Ok(d.as_ref()),
            _ => Err(gpu_err("an activation tier with no device".into())),
        }
    }

    /// A batch's home for `rows` rows of each of `parts`.
    pub fn home(&self, parts: &[ActPart], rows: usize) -> Result<ActivationHome> {
        let dev = self.device()?;
        let tensors = parts
            .iter()
            .map(|p| dev.allocate(&Shape::new([p.elems(rows)?]), p.dtype).map_err(tier_err))
            .collect::<Result<Vec<_>>>()?;
        Ok(ActivationHome { parts: tensors, rows, id: HOMES.fetch_add(1, Ordering::Relaxed) })
    }
}

/// One batch's hidden states on their tier: a 1-D tensor per part, `rows ×
/// width` values.
#[derive(Debug)]
pub struct ActivationHome {
    parts: Vec<Tensor>,
    rows: usize,
    id: u64,
}

impl ActivationHome {
    /// Rows the home holds (its batch's largest step).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held on the tier.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|t| t.byte_len() as u64).sum()
    }

    /// The parts' tensors.
    pub fn tensors(&self) -> &[Tensor] {
        &self.parts
    }
}

/// A family's GPU buffer for one batch's hidden states: its parts' GPU
/// tensors, in the parts' order, each 1-D with room for the block's
/// largest step.
pub trait ActBuffers {
    fn part_tensors(&self) -> Vec<&Tensor>;
}

impl<T: DevElem> ActBuffers for DevBuf<T> {
    fn part_tensors(&self) -> Vec<&Tensor> {
        vec![self.tensor()]
    }
}

/// What a use does with a batch's hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Writes every value of the step's rows (the embedding): nothing is
    /// loaded.
    Write,
    /// Reads and writes them (a layer).
    Update,
    /// Only reads them (the logits): nothing is stored after.
    Read,
}

/// Copies the first `rows` rows of every part from `src` to `dst` through
/// `matrix`, all parts at once; returns the bytes moved.
pub fn copy_rows(matrix: &CopyMatrix, parts: &[ActPart], src: &[Tensor], dst: &[Tensor], rows: usize) -> Result<u64> {
    if src.len() != parts.len() || dst.len() != parts.len() {
        return Err(gpu_err(format!(
            "hidden states of {} parts copied between {} and {} tensors",
            parts.len(),
            src.len(),
            dst.len()
        )));
    }
    // On this thread, ahead of the matrix's queue: the caller waits for
    // these rows at once, and queued behind the next layer's weight copies
    // they would hold the compute back until all of those had finished.
    let mut bytes = 0;
    for ((p, s), d) in parts.iter().zip(src).zip(dst) {
        let n = p.elems(rows)?;
        if n == 0 {
            continue;
        }
        let from = s.narrow(0, 0, n).map_err(tier_err)?;
        let to = d.narrow(0, 0, n).map_err(tier_err)?;
        bytes += matrix.copy_here(&from, &to).map_err(tier_err)?.bytes;
    }
    Ok(bytes)
}

/// Unstored values in a buffer: whose, how many rows, where they go.
#[derive(Debug)]
struct Dirty<H> {
    id: u64,
    rows: usize,
    to: H,
}

/// What to do before a use, in order.
#[derive(Debug, PartialEq)]
enum Step<H> {
    /// Wait for the buffer's last compute.
    Wait(usize),
    /// Store the buffer's first `rows` rows to `to`.
    Store { buf: usize, to: H, rows: usize },
    /// Load the home's rows into the buffer.
    Load(usize),
}

/// The host's book of the two buffers: which holds whose newest values
/// unstored, which has a compute not yet waited for, which is next. Pure,
/// so that its order is tested without a GPU; `H` is where a store goes.
#[derive(Debug)]
struct Book<H> {
    dirty: [Option<Dirty<H>>; 2],
    recorded: [bool; 2],
    next: usize,
}

impl<H> Default for Book<H> {
    fn default() -> Self {
        Book { dirty: [None, None], recorded: [false; 2], next: 0 }
    }
}

impl<H> Book<H> {
    fn wait(&mut self, buf: usize, steps: &mut Vec<Step<H>>) {
        if self.recorded[buf] {
            self.recorded[buf] = false;
            steps.push(Step::Wait(buf));
        }
    }

    /// The buffer a use of home `id` takes and the steps before it.
    fn begin(&mut self, id: u64, how: Use) -> (usize, Vec<Step<H>>) {
        let i = self.next;
        let o = 1 - i;
        let mut steps = Vec::new();
        // The other buffer holds this home's newest values (its previous
        // use was this home's): stored first, or let go when this use
        // writes them all anew.
        if self.dirty[o].as_ref().is_some_and(|d| d.id == id) {
            if let Some(d) = self.dirty[o].take() {
                if how != Use::Write {
                    self.wait(o, &mut steps);
                    steps.push(Step::Store { buf: o, to: d.to, rows: d.rows });
                }
            }
        }
        // This buffer's own: home once its compute has finished (let go
        // when they are this home's and this use writes them anew).
        if let Some(d) = self.dirty[i].take() {
            if !(d.id == id && how == Use::Write) {
                self.wait(i, &mut steps);
                steps.push(Step::Store { buf: i, to: d.to, rows: d.rows });
            }
        }
        if how != Use::Write {
            // No copy into the buffer while a compute may still read it.
            self.wait(i, &mut steps);
            steps.push(Step::Load(i));
        }
        (i, steps)
    }

    /// After the use's compute was enqueued on buffer `i` (and its event
    /// recorded, `recorded`).
    fn end(&mut self, i: usize, id: u64, rows: usize, how: Use, to: H, recorded: bool) {
        self.recorded[i] = recorded;
        self.dirty[i] = (how != Use::Read).then_some(Dirty { id, rows, to });
        self.next = 1 - i;
    }

    /// After a failed use of buffer `i`: its contents are nobody's.
    fn fail(&mut self, i: usize, recorded: bool) {
        self.recorded[i] = recorded;
        self.dirty[i] = None;
        self.next = 1 - i;
    }
}

/// The block's two GPU buffers for hidden states kept on a tier, and the
/// loads and stores around each use (see the module's documentation).
pub struct ActivationStreamer<B: ActBuffers> {
    tier: ActivationTier,
    parts: Vec<ActPart>,
    rows: usize,
    bufs: [B; 2],
    done: [Event; 2],
    book: Book<Vec<Tensor>>,
    bytes_moved: u64,
}

impl<B: ActBuffers> std::fmt::Debug for ActivationStreamer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationStreamer")
            .field("tier", &self.tier)
            .field("parts", &self.parts)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl<B: ActBuffers> ActivationStreamer<B> {
    /// A streamer over `tier` for hidden states of `parts`, with the
    /// family's two GPU buffers `bufs`, each holding at least `rows` rows
    /// of every part (checked: their tensors' count, types and sizes).
    pub fn new(gpu: &Gpu, tier: &ActivationTier, parts: &[ActPart], rows: usize, bufs: [B; 2]) -> Result<Self> {
        if parts.is_empty() || parts.iter().any(|p| p.width == 0) {
            return Err(gpu_err(format!("hidden states of parts {parts:?}: every width must be positive")));
        }
        for buf in &bufs {
            let tensors = buf.part_tensors();
            if tensors.len() != parts.len() {
                return Err(gpu_err(format!(
                    "a GPU buffer of {} parts for hidden states of {}",
                    tensors.len(),
                    parts.len()
                )));
            }
            for (t, p) in tensors.iter().zip(parts) {
                let need = p.bytes(rows)?;
                if t.dtype() != p.dtype || (t.byte_len() as u64) < need {
                    return Err(gpu_err(format!(
                        "a GPU buffer of {} bytes of {} for {rows} rows of {} values of {}",
                        t.byte_len(),
                        t.dtype(),
                        p.width,
                        p.dtype
                    )));
                }
            }
        }
        Ok(ActivationStreamer {
            tier: tier.clone(),
            parts: parts.to_vec(),
            rows,
            bufs,
            done: [Event::new(gpu)?, Event::new(gpu)?],
            book: Book::default(),
            bytes_moved: 0,
        })
    }

    /// A home on the tier for a batch of `rows` rows (its first step's).
    pub fn home(&self, rows: usize) -> Result<ActivationHome> {
        self.tier.home(&self.parts, rows)
    }

    /// Rows each buffer holds.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of the two GPU buffers (`2 × rows ×` every part's width and
    /// type: twice what one shared buffer loaded and stored synchronously
    /// would hold).
    pub fn gpu_bytes(&self) -> u64 {
        self.bufs.iter().flat_map(ActBuffers::part_tensors).map(|t| t.byte_len() as u64).sum()
    }

    /// Bytes loaded and stored so far.
    pub fn bytes_moved(&self) -> u64 {
        self.bytes_moved
    }

    /// The tier.
    pub fn tier(&self) -> &ActivationTier {
        &self.tier
    }

    fn check(&self, home: &ActivationHome, rows: usize) -> Result<()> {
        if rows > home.rows || rows > self.rows || home.parts.len() != self.parts.len() {
            return Err(gpu_err(format!(
                "hidden states of {rows} rows: the home holds {}, the GPU buffers {}",
                home.rows, self.rows
            )));
        }
        Ok(())
    }

    /// One use of the batch whose home is `home`, its step `rows` rows:
    /// `compute` is the family's, enqueued on `gpu`'s stream over the
    /// buffer this use takes (loaded first unless `how` is
    /// [`Use::Write`]); the buffer's contents go home when it is next used.
    pub fn run<R, E, F>(&mut self, gpu: &Gpu, home: &ActivationHome, rows: usize, how: Use, compute: F) -> Result<R, E>
    where
        E: From<Error>,
        F: FnOnce(&B) -> Result<R, E>,
    {
        self.check(home, rows)?;
        let (i, steps) = self.book.begin(home.id, how);
        for step in steps {
            if let Err(e) = self.step(step, home, rows) {
                self.book.fail(i, false);
                return Err(e.into());
            }
        }
        let result = compute(&self.bufs[i]);
        let recorded = self.done[i].record(gpu).is_ok();
        match result {
            Ok(r) if recorded => {
                self.book.end(i, home.id, rows, how, home.parts.clone(), true);
                Ok(r)
            }
            Ok(_) => {
                self.book.fail(i, false);
                Err(gpu_err("recording the hidden states' event".into()).into())
            }
            Err(e) => {
                self.book.fail(i, recorded);
                Err(e)
            }
        }
    }

    fn step(&mut self, step: Step<Vec<Tensor>>, home: &ActivationHome, rows: usize) -> Result<()> {
        match step {
            Step::Wait(b) => Ok(self.done[b].synchronize()?),
            Step::Store { buf, to, rows } => {
                let src = self.bufs[buf].part_tensors().into_iter().cloned().collect::<Vec<_>>();
                self.bytes_moved += copy_rows(&self.tier.matrix, &self.parts, &src, &to, rows)?;
                Ok(())
            }
            Step::Load(buf) => {
                let dst = self.bufs[buf].part_tensors().into_iter().cloned().collect::<Vec<_>>();
                self.bytes_moved += copy_rows(&self.tier.matrix, &self.parts, &home.parts, &dst, rows)?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_part(width: usize) -> ActPart {
        ActPart { dtype: DType::F32, width }
    }

    /// A run of the book over a block of batches, with each buffer's and
    /// home's contents as a version number: every load and every compute
    /// must see the batch's newest version.
    struct Sim {
        book: Book<u64>,
        bufs: [Option<(u64, u32)>; 2],
        homes: Vec<u32>,
        /// The newest version of each batch's states.
        newest: Vec<u32>,
        /// Whether each buffer's compute finished (waited for).
        busy: [bool; 2],
        loads: usize,
        stores: usize,
    }

    impl Sim {
        fn new(batches: usize) -> Self {
            Sim {
                book: Book::default(),
                bufs: [None, None],
                homes: vec![0; batches],
                newest: vec![0; batches],
                busy: [false; 2],
                loads: 0,
                stores: 0,
            }
        }

        fn run(&mut self, k: usize, how: Use) -> usize {
            let (i, steps) = self.book.begin(k as u64, how);
            for s in steps {
                match s {
                    Step::Wait(b) => self.busy[b] = false,
                    Step::Store { buf, to, .. } => {
                        assert!(!self.busy[buf], "a store before its compute finished");
                        let (id, v) = self.bufs[buf].expect("a store from an empty buffer");
                        assert_eq!(id, to, "a buffer stored to another batch's home");
                        self.homes[to as usize] = v;
                        self.stores += 1;
                    }
                    Step::Load(buf) => {
                        assert!(!self.busy[buf], "a load into a buffer a compute may read");
                        assert_eq!(
                            self.homes[k], self.newest[k],
                            "batch {k} loaded before its newest values were stored"
                        );
                        self.bufs[buf] = Some((k as u64, self.homes[k]));
                        self.loads += 1;
                    }
                }
            }
            match how {
                Use::Write => self.newest[k] += 1,
                Use::Update => {
                    assert_eq!(self.bufs[i], Some((k as u64, self.newest[k])), "batch {k} computed on stale values");
                    self.newest[k] += 1;
                }
                Use::Read => assert_eq!(self.bufs[i], Some((k as u64, self.newest[k])), "batch {k} read stale values"),
            }
            self.bufs[i] = Some((k as u64, self.newest[k]));
            self.busy[i] = true;
            self.book.end(i, k as u64, 1, how, k as u64, true);
            i
        }

        /// FlexGen's order for `steps` steps of `layers` layers.
        fn generate(&mut self, steps: usize, layers: usize) {
            let n = self.homes.len();
            for _ in 0..steps {
                for k in 0..n {
                    self.run(k, Use::Write);
                }
                for _ in 0..layers {
                    for k in 0..n {
                        self.run(k, Use::Update);
                    }
                }
                for k in 0..n {
                    self.run(k, Use::Read);
                }
            }
        }
    }

    #[test]
    fn every_load_sees_the_newest_values_in_any_block() {
        for batches in 1..=4 {
            let mut sim = Sim::new(batches);
            sim.generate(3, 4);
            assert!(sim.loads > 0 && sim.stores > 0, "{batches} batches: nothing went off the GPU");
        }
    }

    #[test]
    fn the_buffers_alternate_and_each_layer_goes_home_and_back() {
        let mut sim = Sim::new(3);
        let used: Vec<usize> = (0..6).map(|k| sim.run(k % 3, if k < 3 { Use::Write } else { Use::Update })).collect();
        assert_eq!(used, [0, 1, 0, 1, 0, 1]);
        // Every layer of a batch (after its embedding) loads its states;
        // every buffer reused stores what it held.
        assert_eq!(sim.loads, 3);
        assert_eq!(sim.stores, 4);
    }

    #[test]
    fn a_store_waits_for_its_compute_and_a_load_for_the_buffer_s_last_reader() {
        let mut book: Book<u64> = Book::default();
        // Batch 0 embedded on buffer 0, batch 1 on buffer 1.
        let (i, steps) = book.begin(0, Use::Write);
        assert_eq!((i, steps), (0, vec![]));
        book.end(0, 0, 4, Use::Write, 0, true);
        let (i, steps) = book.begin(1, Use::Write);
        assert_eq!((i, steps), (1, vec![]));
        book.end(1, 1, 4, Use::Write, 1, true);
        // Batch 0's layer on buffer 0: its own states, stored and loaded
        // back, after the embedding's compute.
        let (i, steps) = book.begin(0, Use::Update);
        assert_eq!((i, steps), (0, vec![Step::Wait(0), Step::Store { buf: 0, to: 0, rows: 4 }, Step::Load(0)]));
        book.end(0, 0, 4, Use::Update, 0, true);
        // One batch: the other buffer holds its newest values: stored
        // first (waiting for that compute), then loaded.
        let mut book: Book<u64> = Book::default();
        book.begin(7, Use::Write);
        book.end(0, 7, 2, Use::Write, 7, true);
        let (i, steps) = book.begin(7, Use::Update);
        assert_eq!((i, steps), (1, vec![Step::Wait(0), Step::Store { buf: 0, to: 7, rows: 2 }, Step::Load(1)]));
        book.end(1, 7, 2, Use::Update, 7, true);
        // A new step's embedding lets the old values go.
        let (i, steps) = book.begin(7, Use::Write);
        assert_eq!((i, steps), (0, vec![]));
        // A failed use leaves the buffer holding nobody's values.
        book.fail(0, false);
        assert!(book.dirty[0].is_none() && book.next == 1);
    }

    #[test]
    fn parts_count_their_bytes_and_refuse_overflow() {
        let parts = [f32_part(8), ActPart { dtype: DType::F16, width: 8 }];
        assert_eq!(parts_bytes(&parts, 3).unwrap(), 3 * 8 * 4 + 3 * 8 * 2);
        assert!(f32_part(usize::MAX).elems(2).is_err());
        assert!(f32_part(usize::MAX / 2).bytes(1).is_err());
        assert!(parts_bytes(&[f32_part(1 << 40), f32_part(1 << 40)], 1 << 22).is_err());
    }

    #[test]
    fn the_policy_names_one_tier_or_is_refused() {
        let tiers = crate::Tiers::default();
        let dir = tempfile::tempdir().unwrap();
        let act = |gpu: f64, cpu: f64| Policy { act_gpu_percent: gpu, act_cpu_percent: cpu, ..Policy::default() };
        assert!(ActivationTier::of_policy(&tiers, &act(100.0, 0.0), dir.path()).unwrap().is_none());
        let host = ActivationTier::of_policy(&tiers, &act(0.0, 100.0), dir.path()).unwrap().unwrap();
        assert!(host.host.is_some() && !host.on_disk());
        let disk = ActivationTier::of_policy(&tiers, &act(0.0, 0.0), dir.path()).unwrap().unwrap();
        assert!(disk.on_disk() && disk.host.is_none());
        for (g, c) in [(50.0, 50.0), (0.0, 40.0), (30.0, 0.0)] {
            let e = ActivationTier::of_policy(&tiers, &act(g, c), dir.path()).unwrap_err().to_string();
            assert!(e.contains("one tier") && e.contains("0 100"), "{g} {c}: {e}");
        }
    }

    /// Homes on host memory and disk hold each part whole, and a step's
    /// rows go from one to the other and back through the copy matrix, the
    /// rest untouched.
    #[test]
    fn homes_hold_every_part_and_copies_move_only_the_step_s_rows() {
        let tiers = crate::Tiers::default();
        let dir = tempfile::tempdir().unwrap();
        let host = ActivationTier::new(&tiers, None).unwrap();
        let disk = ActivationTier::new(&tiers, Some(dir.path())).unwrap();
        let parts = [f32_part(6), ActPart { dtype: DType::F16, width: 6 }];
        let a = host.home(&parts, 5).unwrap();
        let b = disk.home(&parts, 5).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!((a.rows(), a.bytes()), (5, parts_bytes(&parts, 5).unwrap()));
        assert_eq!(b.tensors()[1].dtype(), DType::F16);
        let bytes = |t: &Tensor| t.to_bytes().unwrap();
        let f32s: Vec<u8> = (0..30u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let f16s: Vec<u8> = (0..30u32).flat_map(|v| half::f16::from_f32(v as f32).to_le_bytes()).collect();
        a.tensors()[0].write_bytes(0, &f32s).unwrap();
        a.tensors()[1].write_bytes(0, &f16s).unwrap();
        b.tensors()[0].write_bytes(0, &[0u8; 120]).unwrap();
        b.tensors()[1].write_bytes(0, &[0u8; 60]).unwrap();
        // Two rows to disk: 2 × 6 values of each part.
        let moved = copy_rows(host.matrix(), &parts, a.tensors(), b.tensors(), 2).unwrap();
        assert_eq!(moved, 2 * 6 * 4 + 2 * 6 * 2);
        assert_eq!(&bytes(&b.tensors()[0])[..48], &f32s[..48]);
        assert!(bytes(&b.tensors()[0])[48..].iter().all(|&x| x == 0), "rows past the step's were copied");
        assert_eq!(&bytes(&b.tensors()[1])[..24], &f16s[..24]);
        // And back into a fresh host home.
        let c = host.home(&parts, 5).unwrap();
        copy_rows(host.matrix(), &parts, b.tensors(), c.tensors(), 2).unwrap();
        assert_eq!(&bytes(&c.tensors()[0])[..48], &f32s[..48]);
        assert!(copy_rows(host.matrix(), &parts, &a.tensors()[..1], b.tensors(), 1).is_err());
        let held = disk.disk.as_ref().unwrap().stats().peak_resident;
        assert!(held >= parts_bytes(&parts, 5).unwrap(), "the disk home is {held} bytes");
    }
}
