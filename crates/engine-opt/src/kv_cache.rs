//! The key/value cache: for each layer, the keys and values of every token
//! seen so far, per sequence and head, kept in f32 on the host.

/// Keys and values of one layer for a batch of sequences.
///
/// Layout `[batch][head][position][head_dim]`, so that one head of one
/// sequence is a contiguous `len × head_dim` matrix.
#[derive(Debug, Clone)]
pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    batch: usize,
    heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl LayerCache {
    /// An empty cache with room for `capacity` positions per sequence.
    pub fn new(batch: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        let size = batch * heads * capacity * head_dim;
        LayerCache { keys: vec![0.0; size], values: vec![0.0; size], batch, heads, head_dim, capacity, len: 0 }
    }

    /// Positions stored so far (the same for every sequence: padding counts).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Bytes held (keys and values, whole capacity).
    pub fn bytes(&self) -> u64 {
        ((self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()) as u64
    }

    /// Appends the keys and values of `new_len` new tokens per sequence.
    /// `keys` and `values` are `[batch × new_len, heads × head_dim]`, the
    /// layout the projections produce.
    ///
    /// # Panics
    /// If the sizes disagree or the cache is full; the generation loop checks
    /// lengths against the capacity before it runs.
    pub fn append(&mut self, keys: &[f32], values: &[f32], new_len: usize) {
        let hidden = self.heads * self.head_dim;
        assert_eq!(keys.len(), self.batch * new_len * hidden, "cache append: key size");
        assert_eq!(values.len(), keys.len(), "cache append: value size");
        assert!(self.len + new_len <= self.capacity, "cache overflow");
        for b in 0..self.batch {
            for s in 0..new_len {
                let src = (b * new_len + s) * hidden;
                for h in 0..self.heads {
                    let dst = self.offset(b, h) + (self.len + s) * self.head_dim;
                    let from = src + h * self.head_dim;
                    self.keys[dst..dst + self.head_dim].copy_from_slice(&keys[from..from + self.head_dim]);
                    self.values[dst..dst + self.head_dim].copy_from_slice(&values[from..from + self.head_dim]);
                }
            }
        }
        self.len += new_len;
    }

    /// Keys and values, every position of the capacity (a tier copies
    /// them whole).
    pub(crate) fn data(&self) -> (&[f32], &[f32]) {
        (&self.keys, &self.values)
    }

    /// The same, to write into.
    pub(crate) fn data_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        (&mut self.keys, &mut self.values)
    }

    /// Records that `len` positions are stored (after their keys and
    /// values were written through [`LayerCache::data_mut`]).
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity);
    }

    /// Heads, values per head, positions per sequence.
    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.heads, self.head_dim, self.capacity)
    }

    fn offset(&self, b: usize, h: usize) -> usize {
        (b * self.heads + h) * self.capacity * self.head_dim
    }

    /// Keys of sequence `b`, head `h`: `len × head_dim`, row-major.
    pub fn keys(&self, b: usize, h: usize) -> &[f32] {
        let o = self.offset(b, h);
        &self.keys[o..o + self.len * self.head_dim]
    }

    /// Values of sequence `b`, head `h`: `len × head_dim`, row-major.
    pub fn values(&self, b: usize, h: usize) -> &[f32] {
        let o = self.offset(b, h);
        &self.values[o..o + self.len * self.head_dim]
    }
}

/// The caches of every layer for one batch.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    /// Empty caches for `layers` layers.
    pub fn new(layers: usize, batch: usize, heads: usize, head_dim: usize, capacity: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| LayerCache::new(batch, heads, head_dim, capacity)).collect() }
    }

    /// Bytes held by all layers.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_lays_out_per_head() {
        // batch 2, heads 2, head_dim 2, two tokens then one.
        let mut c = LayerCache::new(2, 2, 2, 4);
        let k: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..16).map(|i| -(i as f32)).collect();
        c.append(&k, &v, 2);
        // sequence 1, head 0: rows (token 0: [8, 9]), (token 1: [12, 13])
        assert_eq!(c.keys(1, 0), &[8.0, 9.0, 12.0, 13.0]);
        assert_eq!(c.values(0, 1), &[-2.0, -3.0, -6.0, -7.0]);
        let k2: Vec<f32> = (100..108).map(|i| i as f32).collect();
        c.append(&k2, &k2, 1);
        assert_eq!(c.len(), 3);
        assert_eq!(c.keys(1, 1), &[10.0, 11.0, 14.0, 15.0, 106.0, 107.0]);
    }
}
