//! A restricted unpickler for the `data.pkl` of a `torch.save` archive.
//!
//! It runs nothing: it interprets the pickle opcodes `torch.save` emits
//! (protocol 2, and the cheap ones of protocols 3 to 5) into a small object
//! graph of its own, where the only callables are Python globals on an
//! allowlist — `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_tensor`, `torch._utils._rebuild_parameter` and the
//! typed storage classes `torch.FloatStorage` and friends — and `REDUCE` on
//! one of them is emulated here, in Rust. Any other global (`os.system`,
//! `builtins.eval`, `torch.nn.Module`, ...) stops the reading at its
//! `GLOBAL`/`STACK_GLOBAL` opcode with [`PickleError::Forbidden`], before any
//! later opcode is looked at.
//!
//! Objects live in an arena and the stack and memo hold indices into it, so
//! a container mutated after it was memoized is seen mutated through the
//! memo, as in Python. Every opcode makes at most one object, so memory is
//! bounded by the input's length; the stack, the mark stack and the memo
//! are bounded too, and every length read from the input is checked against
//! what remains of it before anything is allocated.
//!
//! The result is the state dict: a dict (or `OrderedDict`) from names to
//! tensor records (storage key, dtype, offset, shape, strides), in pickle
//! order.

use crate::Dtype;

/// The most objects on the stack at once.
const MAX_STACK: usize = 1 << 20;
/// The most open marks at once.
const MAX_MARKS: usize = 1 << 16;
/// The most memo entries.
const MAX_MEMO: usize = 1 << 22;
/// The longest `GLOBAL` line (module or name).
const MAX_GLOBAL_LINE: usize = 256;

/// Why a pickle was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickleError {
    /// It names a global outside the allowlist (`module.name`).
    Forbidden(String),
    /// It is truncated, malformed, or uses something this reader does not.
    Invalid(String),
}

/// A tensor as the pickle describes it: which storage, where in it, and its
/// shape and strides (both in elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRecord {
    /// The storage's key: its entry is `<prefix>/data/<key>`.
    pub storage_key: String,
    /// The element type, from the storage's class.
    pub dtype: Dtype,
    /// The storage's size in elements, as the pickle claims it.
    pub storage_numel: u64,
    /// Where the tensor starts in its storage, in elements.
    pub storage_offset: u64,
    /// The tensor's shape.
    pub shape: Vec<u64>,
    /// The tensor's strides, in elements.
    pub strides: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType(StorageDtype),
}

/// The storage classes' dtypes, kept `Copy` apart from [`Dtype`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageDtype {
    F16,
    BF16,
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    fn dtype(self) -> Dtype {
        match self {
            StorageDtype::F16 => Dtype::F16,
            StorageDtype::BF16 => Dtype::BF16,
            StorageDtype::F32 => Dtype::F32,
            StorageDtype::F64 => Dtype::F64,
            StorageDtype::I64 => Dtype::I64,
            StorageDtype::I32 => Dtype::I32,
            StorageDtype::I16 => Dtype::I16,
            StorageDtype::I8 => Dtype::I8,
            StorageDtype::U8 => Dtype::U8,
            StorageDtype::Bool => Dtype::Bool,
        }
    }
}

/// The allowlist: the only globals a state dict needs.
fn allowed(module: &str, name: &str) -> Option<Global> {
    let storage = |d| Some(Global::StorageType(d));
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Some(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", "HalfStorage") => storage(StorageDtype::F16),
        ("torch", "BFloat16Storage") => storage(StorageDtype::BF16),
        ("torch", "FloatStorage") => storage(StorageDtype::F32),
        ("torch", "DoubleStorage") => storage(StorageDtype::F64),
        ("torch", "LongStorage") => storage(StorageDtype::I64),
        ("torch", "IntStorage") => storage(StorageDtype::I32),
        ("torch", "ShortStorage") => storage(StorageDtype::I16),
        ("torch", "CharStorage") => storage(StorageDtype::I8),
        ("torch", "ByteStorage") => storage(StorageDtype::U8),
        ("torch", "BoolStorage") => storage(StorageDtype::Bool),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Storage {
    key: String,
    dtype: StorageDtype,
    numel: u64,
}

#[derive(Debug, Clone)]
enum Obj {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(Storage),
    Tensor(TensorRecord),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool => "a bool",
            Obj::Int(_) => "an int",
            Obj::Float => "a float",
            Obj::Str(_) => "a str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Global(_) => "a class or function",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

fn invalid(reason: impl Into<String>) -> PickleError {
    PickleError::Invalid(reason.into())
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    objects: Vec<Obj>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u32, usize>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.input.len())
            .ok_or_else(|| invalid(format!("truncated pickle: {n} bytes wanted at byte {}", self.pos)))?;
        let s = &self.input[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.arr::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64_len(&mut self) -> Result<usize, PickleError> {
        let n = u64::from_le_bytes(self.arr()?);
        usize::try_from(n).map_err(|_| invalid(format!("length {n} at byte {} is too large", self.pos)))
    }

    fn new_obj(&mut self, obj: Obj) -> usize {
        self.objects.push(obj);
        self.objects.len() - 1
    }

    fn push(&mut self, id: usize) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(invalid(format!("pickle stack deeper than {MAX_STACK}")));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, obj: Obj) -> Result<(), PickleError> {
        let id = self.new_obj(obj);
        self.push(id)
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(invalid(format!("pickle stack underflow at byte {}", self.pos)));
        }
        self.stack.pop().ok_or_else(|| invalid("pickle stack underflow"))
    }

    fn top(&self) -> Result<usize, PickleError> {
        if self.stack.len() <= self.floor() {
            return Err(invalid(format!("pickle stack underflow at byte {}", self.pos)));
        }
        self.stack.last().copied().ok_or_else(|| invalid("pickle stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>, PickleError> {
        let mark = self.marks.pop().ok_or_else(|| invalid(format!("no MARK before byte {}", self.pos)))?;
        Ok(self.stack.split_off(mark))
    }

    fn put(&mut self, key: u32) -> Result<(), PickleError> {
        let id = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&key) {
            return Err(invalid(format!("pickle memo larger than {MAX_MEMO}")));
        }
        self.memo.insert(key, id);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Result<(), PickleError> {
        let id = *self.memo.get(&key).ok_or_else(|| invalid(format!("memo key {key} read before it was written")))?;
        self.push(id)
    }

    fn string(&mut self, n: usize) -> Result<(), PickleError> {
        let at = self.pos;
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| invalid(format!("string at byte {at} is not UTF-8")))?;
        self.push_new(Obj::Str(s.to_string()))
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let at = self.pos;
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .take(MAX_GLOBAL_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| invalid(format!("GLOBAL at byte {at}: no newline within {MAX_GLOBAL_LINE} bytes")))?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| invalid(format!("GLOBAL at byte {at} is not UTF-8")))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        match allowed(module, name) {
            Some(g) => self.push_new(Obj::Global(g)),
            None => Err(PickleError::Forbidden(format!("{module}.{name}"))),
        }
    }

    fn str_of(&self, id: usize) -> Option<&str> {
        match &self.objects[id] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    fn int_of(&self, id: usize, what: &str) -> Result<u64, PickleError> {
        match &self.objects[id] {
            Obj::Int(v) => u64::try_from(*v).map_err(|_| invalid(format!("{what} is negative ({v})"))),
            other => Err(invalid(format!("{what} is {}, not an int", other.kind()))),
        }
    }

    fn ints_of(&self, id: usize, what: &str) -> Result<Vec<u64>, PickleError> {
        match &self.objects[id] {
            Obj::Tuple(items) | Obj::List(items) => items.iter().map(|&i| self.int_of(i, what)).collect(),
            other => Err(invalid(format!("{what} is {}, not a tuple", other.kind()))),
        }
    }

    fn tuple_of(&self, id: usize, what: &str) -> Result<&[usize], PickleError> {
        match &self.objects[id] {
            Obj::Tuple(items) => Ok(items),
            other => Err(invalid(format!("{what} is {}, not a tuple", other.kind()))),
        }
    }

    fn persistent_load(&mut self, pid: usize) -> Result<(), PickleError> {
        let items = self.tuple_of(pid, "a persistent id")?;
        let [tag, class, key, _location, numel] = items else {
            return Err(invalid(format!("a persistent id has {} fields, not 5", items.len())));
        };
        if self.str_of(*tag) != Some("storage") {
            return Err(invalid("a persistent id is not a ('storage', ...) tuple"));
        }
        let dtype = match &self.objects[*class] {
            Obj::Global(Global::StorageType(d)) => *d,
            other => return Err(invalid(format!("a persistent id's storage type is {}", other.kind()))),
        };
        let key = self.str_of(*key).ok_or_else(|| invalid("a persistent id's storage key is not a str"))?.to_string();
        let numel = self.int_of(*numel, "a storage's size")?;
        self.push_new(Obj::Storage(Storage { key, dtype, numel }))
    }

    fn rebuild_tensor(&self, args: &[usize]) -> Result<Obj, PickleError> {
        let storage = match &self.objects[args[0]] {
            Obj::Storage(s) => s.clone(),
            other => return Err(invalid(format!("a tensor's storage is {}", other.kind()))),
        };
        let storage_offset = self.int_of(args[1], "a tensor's storage offset")?;
        let shape = self.ints_of(args[2], "a tensor's size")?;
        let strides = self.ints_of(args[3], "a tensor's stride")?;
        if shape.len() != strides.len() {
            return Err(invalid(format!("a tensor has {} sizes but {} strides", shape.len(), strides.len())));
        }
        Ok(Obj::Tensor(TensorRecord {
            storage_key: storage.key,
            dtype: storage.dtype.dtype(),
            storage_numel: storage.numel,
            storage_offset,
            shape,
            strides,
        }))
    }

    /// `REDUCE`: the "call" of an allowlisted global, emulated.
    fn reduce(&mut self) -> Result<(), PickleError> {
        let args_id = self.pop()?;
        let func_id = self.pop()?;
        let func = match &self.objects[func_id] {
            Obj::Global(g) => *g,
            other => return Err(invalid(format!("REDUCE calls {}, not an allowed function", other.kind()))),
        };
        let args = self.tuple_of(args_id, "REDUCE's arguments")?.to_vec();
        let obj = match func {
            Global::OrderedDict if args.is_empty() => Obj::Dict(Vec::new()),
            Global::OrderedDict => return Err(invalid("OrderedDict is called with arguments")),
            Global::RebuildTensorV2 if (6..=7).contains(&args.len()) => self.rebuild_tensor(&args)?,
            Global::RebuildTensor if args.len() == 4 => self.rebuild_tensor(&args)?,
            Global::RebuildParameter if args.len() == 3 => match &self.objects[args[0]] {
                Obj::Tensor(_) => return self.push(args[0]),
                other => return Err(invalid(format!("_rebuild_parameter is given {}, not a tensor", other.kind()))),
            },
            Global::StorageType(_) => return Err(invalid("a storage class is called; storages come by persistent id")),
            g => return Err(invalid(format!("{g:?} is called with {} arguments", args.len()))),
        };
        self.push_new(obj)
    }

    fn append(&mut self, list: usize, items: Vec<usize>) -> Result<(), PickleError> {
        match &mut self.objects[list] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => Err(invalid(format!("APPEND to {}, not a list", other.kind()))),
        }
    }

    fn set_items(&mut self, dict: usize, items: Vec<usize>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(invalid("SETITEMS with an odd number of items"));
        }
        match &mut self.objects[dict] {
            Obj::Dict(v) => {
                v.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            other => Err(invalid(format!("SETITEM on {}, not a dict", other.kind()))),
        }
    }

    fn run(&mut self) -> Result<usize, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8().map_err(|_| invalid("truncated pickle: no STOP opcode"))?;
            match op {
                // PROTO
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(invalid(format!("pickle protocol {v} is newer than 5")));
                    }
                }
                // FRAME: framing is transparent to the reader.
                0x95 => {
                    self.u64_len()?;
                }
                // STOP
                b'.' => return self.pop(),
                // MARK
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(invalid(format!("more than {MAX_MARKS} open MARKs")));
                    }
                    self.marks.push(self.stack.len());
                }
                // POP, POP_MARK, DUP
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.push(id)?;
                }
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.push_new(Obj::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_new(Obj::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.push_new(Obj::Int(i64::from(v)))?;
                }
                // LONG1, LONG4: little-endian two's complement.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        usize::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.arr()?);
                        usize::try_from(n).map_err(|_| invalid(format!("LONG4 of negative length at byte {at}")))?
                    };
                    let bytes = self.take(n)?;
                    let v = long(bytes).ok_or_else(|| invalid(format!("integer at byte {at} exceeds 64 bits")))?;
                    self.push_new(Obj::Int(v))?;
                }
                // BINFLOAT
                b'G' => {
                    self.arr::<8>()?;
                    self.push_new(Obj::Float)?;
                }
                // NONE, NEWTRUE, NEWFALSE
                b'N' => self.push_new(Obj::None)?,
                0x88 => self.push_new(Obj::Bool)?,
                0x89 => self.push_new(Obj::Bool)?,
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8; SHORT_BINSTRING
                // and BINSTRING (protocol 2's str of Python 2) read alike.
                0x8c | b'U' => {
                    let n = usize::from(self.u8()?);
                    self.string(n)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.string(n)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.arr()?);
                    let n = usize::try_from(n)
                        .map_err(|_| invalid(format!("BINSTRING of negative length at byte {at}")))?;
                    self.string(n)?;
                }
                0x8d => {
                    let n = self.u64_len()?;
                    self.string(n)?;
                }
                // SHORT_BINBYTES, BINBYTES, BINBYTES8: skipped, kept as a
                // placeholder (a state dict holds no bytes the reader needs).
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => usize::from(self.u8()?),
                        b'B' => self.u32()? as usize,
                        _ => self.u64_len()?,
                    };
                    self.take(n)?;
                    self.push_new(Obj::Bytes)?;
                }
                // EMPTY_TUPLE, TUPLE, TUPLE1..3
                b')' => self.push_new(Obj::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_new(Obj::Tuple(items))?;
                }
                // EMPTY_LIST, LIST, APPEND, APPENDS
                b']' => self.push_new(Obj::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::List(items))?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                // EMPTY_DICT, DICT, SETITEM, SETITEMS
                b'}' => self.push_new(Obj::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = self.new_obj(Obj::Dict(Vec::new()));
                    self.set_items(dict, items)?;
                    self.push(dict)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, items)?;
                }
                // GLOBAL, STACK_GLOBAL: the allowlist decides, here.
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (self.str_of(module), self.str_of(name)) else {
                        return Err(invalid(format!("STACK_GLOBAL at byte {at} on non-strings")));
                    };
                    let (module, name) = (module.to_string(), name.to_string());
                    self.global(&module, &name)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let key = self.u8()?;
                    self.put(u32::from(key))?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.put(key)?;
                }
                0x94 => {
                    let key = u32::try_from(self.memo.len()).map_err(|_| invalid("memo too large"))?;
                    self.put(key)?;
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let key = self.u8()?;
                    self.get(u32::from(key))?;
                }
                b'j' => {
                    let key = self.u32()?;
                    self.get(key)?;
                }
                // BINPERSID: torch's storages.
                b'Q' => {
                    let pid = self.pop()?;
                    self.persistent_load(pid)?;
                }
                b'R' => self.reduce()?,
                // BUILD: only the attribute state torch puts on a state
                // dict (`_metadata`), which is ignored.
                b'b' => {
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.objects[target], Obj::Dict(_)) {
                        return Err(invalid(format!(
                            "BUILD at byte {at} sets the state of {}, which a state dict never does",
                            self.objects[target].kind()
                        )));
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "pickle opcode 0x{other:02x} at byte {at} is not one torch.save writes for a state dict"
                    )))
                }
            }
        }
    }
}

/// A little-endian two's complement integer of at most 8 bytes.
fn long(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    // Longer than 8 bytes only if the extra bytes are sign extension.
    let (low, high) = bytes.split_at(bytes.len().min(8));
    let fill = if negative { 0xff } else { 0 };
    if high.iter().any(|&b| b != fill) {
        return None;
    }
    let mut buf = [fill; 8];
    buf[..low.len()].copy_from_slice(low);
    let v = i64::from_le_bytes(buf);
    // The value's sign must survive the truncation to 64 bits.
    ((v < 0) == negative).then_some(v)
}

/// Reads the state dict of `data.pkl`: names and tensor records, in order.
pub fn read_state_dict(input: &[u8]) -> Result<Vec<(String, TensorRecord)>, PickleError> {
    let mut m = Machine {
        input,
        pos: 0,
        objects: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
    };
    let root = m.run()?;
    let items = match &m.objects[root] {
        Obj::Dict(items) => items,
        other => return Err(invalid(format!("the pickle holds {}, not a state dict of tensors", other.kind()))),
    };
    let mut out = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let name = m.str_of(k).ok_or_else(|| invalid(format!("a state dict key is {}", m.objects[k].kind())))?;
        match &m.objects[v] {
            Obj::Tensor(t) => out.push((name.to_string(), t.clone())),
            other => return Err(invalid(format!("entry {name} of the state dict is {}, not a tensor", other.kind()))),
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pickle writer for tests, opcode by opcode.
    #[derive(Default)]
    pub(crate) struct P(pub Vec<u8>);

    impl P {
        pub fn op(mut self, b: u8) -> Self {
            self.0.push(b);
            self
        }
        pub fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        pub fn s(self, s: &str) -> Self {
            self.op(0x8c).raw(&[s.len() as u8]).raw(s.as_bytes())
        }
        pub fn int(self, v: u8) -> Self {
            self.op(b'K').raw(&[v])
        }
        pub fn global(self, module: &str, name: &str) -> Self {
            self.op(b'c').raw(format!("{module}\n{name}\n").as_bytes())
        }
        pub fn ints(self, v: &[u8]) -> Self {
            let mut p = self.op(b'(');
            for &x in v {
                p = p.int(x);
            }
            p.op(b't')
        }
        /// A `_rebuild_tensor_v2` call on a fresh storage, as torch writes it.
        pub fn tensor(self, key: &str, class: &str, numel: u8, offset: u8, shape: &[u8], stride: &[u8]) -> Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .s("storage")
                .global("torch", class)
                .s(key)
                .s("cpu")
                .int(numel)
                .op(b't')
                .op(b'Q')
                .int(offset)
                .ints(shape)
                .ints(stride)
                .op(0x89)
                .global("collections", "OrderedDict")
                .op(b')')
                .op(b'R')
                .op(b't')
                .op(b'R')
        }
        pub fn state_dict(self) -> Self {
            self.op(0x80).raw(&[2]).global("collections", "OrderedDict").op(b')').op(b'R').op(b'q').raw(&[0])
        }
    }

    fn one_tensor() -> Vec<u8> {
        P::default().state_dict().op(b'(').s("w").tensor("0", "HalfStorage", 6, 0, &[2, 3], &[3, 1]).op(b'u').op(b'.').0
    }

    #[test]
    fn reads_a_state_dict_of_one_tensor() {
        let sd = read_state_dict(&one_tensor()).unwrap();
        assert_eq!(sd.len(), 1);
        let (name, t) = &sd[0];
        assert_eq!(name, "w");
        assert_eq!(t.storage_key, "0");
        assert_eq!(t.dtype, Dtype::F16);
        assert_eq!((t.storage_numel, t.storage_offset), (6, 0));
        assert_eq!((t.shape.as_slice(), t.strides.as_slice()), (&[2u64, 3][..], &[3u64, 1][..]));
    }

    #[test]
    fn shared_storage_through_the_memo_and_protocol_4_opcodes() {
        // Protocol 4 framing, STACK_GLOBAL, MEMOIZE, BINUNICODE8 and a
        // second tensor on the first's storage (BINGET), at an offset.
        let mut p = P::default().op(0x80).raw(&[4]).op(0x95).raw(&0u64.to_le_bytes());
        p = p.s("collections").s("OrderedDict").op(0x93).op(0x94).op(b')').op(b'R').op(0x94); // memo 0, 1
        p = p.op(b'(').op(0x8d).raw(&1u64.to_le_bytes()).raw(b"a");
        p = p
            .s("torch._utils")
            .s("_rebuild_tensor_v2")
            .op(0x93)
            .op(0x94) // memo 2: the function
            .op(b'(')
            .op(b'(')
            .s("storage")
            .s("torch")
            .s("FloatStorage")
            .op(0x93)
            .s("7")
            .s("cpu")
            .int(12)
            .op(b't')
            .op(b'Q')
            .op(0x94) // memo 3: the storage
            .int(0)
            .ints(&[4])
            .ints(&[1])
            .op(0x89)
            .op(b'h')
            .raw(&[0])
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R');
        p = p.s("b").op(b'h').raw(&[2]).op(b'(').op(b'h').raw(&[3]).int(4).ints(&[2, 4]).ints(&[4, 1]);
        p = p.op(0x88).op(b'}').op(b't').op(b'R').op(b'u');
        // Torch's `_metadata` attribute on the state dict: BUILD.
        p = p.op(b'}').op(b'(').s("_metadata").op(b'}').op(b'u').op(b'b').op(b'.');
        let sd = read_state_dict(&p.0).unwrap();
        let names: Vec<&str> = sd.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(sd[0].1.storage_key, "7");
        assert_eq!(sd[1].1.storage_key, "7");
        assert_eq!(sd[1].1.storage_offset, 4);
        assert_eq!(sd[1].1.shape, [2, 4]);
        assert_eq!(sd[1].1.dtype, Dtype::F32);
    }

    #[test]
    fn rebuild_parameter_and_plain_dict_and_setitem() {
        let p = P::default()
            .op(0x80)
            .raw(&[2])
            .op(b'}')
            .s("p")
            .global("torch._utils", "_rebuild_parameter")
            .op(b'(')
            .tensor("0", "BFloat16Storage", 2, 0, &[2], &[1])
            .op(0x88)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R')
            .op(b's')
            .op(b'.');
        let sd = read_state_dict(&p.0).unwrap();
        assert_eq!(sd[0].0, "p");
        assert_eq!(sd[0].1.dtype, Dtype::BF16);
    }

    #[test]
    fn forbidden_globals_are_refused_by_name_before_anything_else() {
        for (module, name) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("__builtin__", "getattr"),
            ("torch.nn.modules.linear", "Linear"),
            ("torch", "load"),
            ("posix", "system"),
        ] {
            // Followed by garbage: the refusal comes first.
            let p =
                P::default().op(0x80).raw(&[2]).global(module, name).s("echo pwned").op(0x85).op(b'R').raw(b"\xff\xff");
            assert_eq!(read_state_dict(&p.0), Err(PickleError::Forbidden(format!("{module}.{name}"))));
            let p = P::default().op(0x80).raw(&[4]).s(module).s(name).op(0x93).raw(b"\xff");
            assert_eq!(read_state_dict(&p.0), Err(PickleError::Forbidden(format!("{module}.{name}"))));
        }
    }

    #[test]
    fn allowed_globals_cannot_be_misused() {
        // A storage class called by REDUCE.
        let p = P::default().op(0x80).raw(&[2]).global("torch", "FloatStorage").op(b')').op(b'R').op(b'.');
        assert!(matches!(read_state_dict(&p.0), Err(PickleError::Invalid(r)) if r.contains("storage class")));
        // OrderedDict with arguments.
        let p = P::default().op(0x80).raw(&[2]).global("collections", "OrderedDict").ints(&[1]).op(b'R').op(b'.');
        assert!(read_state_dict(&p.0).is_err());
        // REDUCE on a non-global.
        let p = P::default().op(0x80).raw(&[2]).s("os").op(b')').op(b'R').op(b'.');
        assert!(read_state_dict(&p.0).is_err());
        // BUILD on a tensor.
        let p = P::default().op(b'}').tensor("0", "HalfStorage", 1, 0, &[1], &[1]).op(b'}').op(b'b').op(b'.');
        assert!(matches!(read_state_dict(&p.0), Err(PickleError::Invalid(r)) if r.contains("BUILD")));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let good = one_tensor();
        for cut in 0..good.len() {
            assert!(read_state_dict(&good[..cut]).is_err(), "cut at {cut}");
        }
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("underflow", vec![b'0', b'.']),
            ("stop on empty", vec![b'.']),
            ("pop mark without mark", vec![b'1']),
            ("get before put", vec![b'h', 5, b'.']),
            ("huge BINUNICODE", [&[b'X'][..], &u32::MAX.to_le_bytes(), b"ab"].concat()),
            ("huge BINUNICODE8", [&[0x8d][..], &u64::MAX.to_le_bytes(), b"ab"].concat()),
            ("huge FRAME", [&[0x95][..], &u64::MAX.to_le_bytes()].concat()),
            ("negative BINSTRING", [&[b'T'][..], &(-1i32).to_le_bytes()].concat()),
            ("negative LONG4", [&[0x8b][..], &(-5i32).to_le_bytes()].concat()),
            ("proto 9", vec![0x80, 9]),
            ("unknown opcode", vec![b'i']),
            ("global without newline", b"cos".to_vec()),
            ("not a dict", vec![b'N', b'.']),
            ("dict of non-tensors", vec![b'}', 0x8c, 1, b'k', b'N', b's', b'.']),
            ("append to non-list", vec![b'N', b'N', b'a']),
            ("odd SETITEMS", vec![b'}', b'(', b'N', b'u']),
            ("long LONG1", [&[0x8a, 9][..], &[1; 9]].concat()),
            ("invalid utf8", vec![0x8c, 1, 0xff]),
        ];
        for (what, bytes) in cases {
            assert!(matches!(read_state_dict(&bytes), Err(PickleError::Invalid(_))), "{what}");
        }
        // A negative offset and mismatched sizes and strides.
        let p = P::default().op(b'}').s("w").tensor("0", "HalfStorage", 6, 0, &[2, 3], &[1]).op(b's').op(b'.');
        assert!(matches!(read_state_dict(&p.0), Err(PickleError::Invalid(r)) if r.contains("strides")));
    }

    #[test]
    fn stack_and_marks_are_bounded() {
        let deep = vec![b'('; MAX_MARKS + 1];
        assert!(matches!(read_state_dict(&deep), Err(PickleError::Invalid(r)) if r.contains("MARK")));
        let mut wide = vec![b'N'];
        wide.extend(std::iter::repeat_n(b'2', MAX_STACK + 1));
        assert!(matches!(read_state_dict(&wide), Err(PickleError::Invalid(r)) if r.contains("stack deeper")));
    }

    #[test]
    fn longs() {
        assert_eq!(long(&[]), Some(0));
        assert_eq!(long(&[0xff]), Some(-1));
        assert_eq!(long(&[0x00, 0x01]), Some(256));
        assert_eq!(long(&[0xff, 0x00]), Some(255));
        assert_eq!(long(&[0xff; 12]), Some(-1));
        assert_eq!(long(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None);
        assert_eq!(long(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }
}
