//! A minimal streaming msgpack reader over a byte slice: one token at a time, without
//! building a value tree (the KV-event hot path: a batch is mostly arrays of small ints).

/// Why the bytes are not msgpack (or not one this reader accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ReadError(pub String);

/// One msgpack token. Containers give their length; their items follow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Tok<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext,
}

/// The deepest nesting accepted when skipping a value.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, Copy)]
pub(super) struct Reader<'a> {
    pub buf: &'a [u8],
}

fn truncated() -> ReadError {
    ReadError("truncated".into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if self.buf.len() < n {
            return Err(truncated());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn be(&mut self, n: usize) -> Result<u64, ReadError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn len(&mut self, n: usize) -> Result<usize, ReadError> {
        let len = self.be(n)? as usize;
        Ok(len)
    }

    /// The next token.
    pub fn next(&mut self) -> Result<Tok<'a>, ReadError> {
        let m = self.take(1)?[0];
        Ok(match m {
            0x00..=0x7f => Tok::Int(i128::from(m)),
            0xe0..=0xff => Tok::Int(i128::from(m as i8)),
            0x80..=0x8f => Tok::Map(usize::from(m & 0x0f)),
            0x90..=0x9f => Tok::Array(usize::from(m & 0x0f)),
            0xa0..=0xbf => Tok::Str(self.take(usize::from(m & 0x1f))?),
            0xc0 => Tok::Nil,
            0xc2 => Tok::Bool(false),
            0xc3 => Tok::Bool(true),
            0xc4..=0xc6 => {
                let n = self.len(1 << (m - 0xc4))?;
                Tok::Bin(self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.len(1 << (m - 0xc7))?;
                self.take(n + 1)?;
                Tok::Ext
            }
            0xca => Tok::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Tok::Float(f64::from_bits(self.be(8)?)),
            0xcc..=0xcf => Tok::Int(i128::from(self.be(1 << (m - 0xcc))?)),
            0xd0 => Tok::Int(i128::from(self.be(1)? as u8 as i8)),
            0xd1 => Tok::Int(i128::from(self.be(2)? as u16 as i16)),
            0xd2 => Tok::Int(i128::from(self.be(4)? as u32 as i32)),
            0xd3 => Tok::Int(i128::from(self.be(8)? as i64)),
            0xd4..=0xd8 => {
                self.take(1 + (1 << (m - 0xd4)))?;
                Tok::Ext
            }
            0xd9..=0xdb => {
                let n = self.len(1 << (m - 0xd9))?;
                Tok::Str(self.take(n)?)
            }
            0xdc | 0xdd => Tok::Array(self.len(2 << (m - 0xdc))?),
            0xde | 0xdf => Tok::Map(self.len(2 << (m - 0xde))?),
            0xc1 => return Err(ReadError("reserved marker 0xc1".into())),
        })
    }

    /// Skips the rest of a value whose first token was `tok`.
    pub fn skip(&mut self, tok: Tok<'a>) -> Result<(), ReadError> {
        self.skip_depth(tok, 0)
    }

    fn skip_depth(&mut self, tok: Tok<'a>, depth: usize) -> Result<(), ReadError> {
        let items = match tok {
            Tok::Array(n) => n,
            Tok::Map(n) => n.checked_mul(2).ok_or_else(truncated)?,
            _ => return Ok(()),
        };
        if depth >= MAX_DEPTH {
            return Err(ReadError("nested too deep".into()));
        }
        for _ in 0..items {
            let t = self.next()?;
            self.skip_depth(t, depth + 1)?;
        }
        Ok(())
    }

    /// A whole value as an owned `rmpv::Value` (rare fields such as `extra_keys`).
    pub fn value(&mut self) -> Result<rmpv::Value, ReadError> {
        let mut rd = self.buf;
        let v = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH)
            .map_err(|e| ReadError(e.to_string()))?;
        self.buf = rd;
        Ok(v)
    }
}
