//! A protobuf body as a tree of fields, so that a mutation at the field
//! level (a varint changed or written too long, a field renumbered or given
//! another wire type, repeated, dropped, moved, an unknown field or deeply
//! nested groups inserted) is written back with every enclosing length
//! right, and so reaches the code past the framing. Schema-free: a
//! length-delimited payload that parses as fields is taken for a message.

/// One field: its number, the wire type written in its key when it is not
/// the value's own, and its value.
#[derive(Debug, Clone)]
pub struct Field {
    pub number: u32,
    pub wire_type: Option<u8>,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub enum Value {
    /// A varint, written with `extra` redundant bytes.
    Varint {
        v: u64,
        extra: u8,
    },
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(Vec<u8>),
    Message(Vec<Field>),
    Group(Vec<Field>),
}

impl Value {
    fn wire_type(&self) -> u8 {
        match self {
            Value::Varint { .. } => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) | Value::Message(_) => 2,
            Value::Group(_) => 3,
            Value::Fixed32(_) => 5,
        }
    }
}

/// How deep [`parse`] looks for messages inside payloads.
const PARSE_DEPTH: u32 = 8;

/// The fields of `buf`, if it is a canonically encoded message (so that
/// [`write()`] gives back the same bytes).
pub fn parse(buf: &[u8]) -> Option<Vec<Field>> {
    let mut pos = 0;
    let fields = parse_fields(buf, &mut pos, PARSE_DEPTH, None)?;
    (pos == buf.len()).then_some(fields)
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// A varint as [`put_varint`] writes it (shortest form).
fn canonical(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let start = *pos;
    let v = varint(buf, pos)?;
    (*pos - start == crate::wire::varint_len(v)).then_some(v)
}

/// Fields up to the end of `buf` or, inside group `group`, to its end.
fn parse_fields(buf: &[u8], pos: &mut usize, depth: u32, group: Option<u32>) -> Option<Vec<Field>> {
    let mut out = Vec::new();
    while *pos < buf.len() {
        let key = canonical(buf, pos)?;
        let number = u32::try_from(key >> 3).ok().filter(|n| *n > 0)?;
        let value = match key & 7 {
            0 => Value::Varint {
                v: canonical(buf, pos)?,
                extra: 0,
            },
            1 => {
                let b = buf.get(*pos..*pos + 8)?.try_into().ok()?;
                *pos += 8;
                Value::Fixed64(b)
            }
            5 => {
                let b = buf.get(*pos..*pos + 4)?.try_into().ok()?;
                *pos += 4;
                Value::Fixed32(b)
            }
            2 => {
                let len = usize::try_from(canonical(buf, pos)?).ok()?;
                let payload = buf.get(*pos..pos.checked_add(len)?)?;
                *pos += len;
                match (depth > 0 && !payload.is_empty()).then(|| {
                    let mut p = 0;
                    parse_fields(payload, &mut p, depth - 1, None).filter(|_| p == payload.len())
                }) {
                    Some(Some(fields)) => Value::Message(fields),
                    _ => Value::Bytes(payload.to_vec()),
                }
            }
            3 if depth > 0 => Value::Group(parse_fields(buf, pos, depth - 1, Some(number))?),
            4 => return (group == Some(number)).then_some(out),
            _ => return None,
        };
        out.push(Field {
            number,
            wire_type: None,
            value,
        });
    }
    group.is_none().then_some(out)
}

fn put_varint(out: &mut Vec<u8>, v: u64, extra: u8) {
    crate::wire::put_varint(out, v);
    if extra > 0 {
        *out.last_mut().expect("a varint has a byte") |= 0x80;
        out.extend(std::iter::repeat(0x80).take(usize::from(extra) - 1));
        out.push(0);
    }
}

/// Writes `fields` as protobuf, lengths computed from what is inside.
pub fn write(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        let wt = f.wire_type.unwrap_or(f.value.wire_type());
        put_varint(out, (u64::from(f.number) << 3) | u64::from(wt & 7), 0);
        match &f.value {
            Value::Varint { v, extra } => put_varint(out, *v, *extra),
            Value::Fixed64(b) => out.extend_from_slice(b),
            Value::Fixed32(b) => out.extend_from_slice(b),
            Value::Bytes(b) => {
                put_varint(out, b.len() as u64, 0);
                out.extend_from_slice(b);
            }
            Value::Message(inner) => {
                let mut body = Vec::new();
                write(inner, &mut body);
                put_varint(out, body.len() as u64, 0);
                out.extend_from_slice(&body);
            }
            Value::Group(inner) => {
                write(inner, out);
                put_varint(out, (u64::from(f.number) << 3) | 4, 0);
            }
        }
    }
}

/// A field-level mutation. Positions (`at`) count the fields of the tree
/// in preorder, modulo their number.
#[derive(Debug, Clone)]
pub enum Edit {
    /// A varint set to one of `VARINTS` (or one more or less than it was).
    SetVarint {
        at: usize,
        pick: usize,
    },
    /// A varint written with redundant bytes (more than nine make it too long).
    Overlong {
        at: usize,
        extra: u8,
    },
    Renumber {
        at: usize,
        pick: usize,
    },
    /// The key written with another wire type, the payload as it was.
    Retype {
        at: usize,
        wire_type: u8,
    },
    Repeat {
        at: usize,
    },
    Drop {
        at: usize,
    },
    SwapNext {
        at: usize,
    },
    /// An unknown field before `at` (groups nested `depth` deep when a group).
    Insert {
        at: usize,
        number: u32,
        kind: u8,
        depth: u32,
    },
    /// A byte of a string or bytes payload set to one no UTF-8 string holds
    /// in that place.
    BadUtf8 {
        at: usize,
        pos: usize,
        byte: u8,
    },
    /// A payload emptied.
    Empty {
        at: usize,
    },
    /// A copy of the field at `from` put before `at`.
    Graft {
        at: usize,
        from: usize,
    },
}

/// Varints that sit on an edge: of one byte, 31, 32 and 64 bits.
const VARINTS: [u64; 12] = [
    0,
    1,
    2,
    127,
    128,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,
    1 << 63,
    u64::MAX,
];

/// Field numbers the schemas use, and edges.
const NUMBERS: [u32; 10] = [1, 2, 3, 4, 5, 6, 17, 18, 0x1fff_ffff, 100];

fn count(list: &[Field]) -> usize {
    list.iter()
        .map(|f| {
            1 + match &f.value {
                Value::Message(c) | Value::Group(c) => count(c),
                _ => 0,
            }
        })
        .sum()
}

/// Calls `f` with the list holding field number `target` (preorder) and its
/// index there.
fn visit(
    list: &mut Vec<Field>,
    target: &mut usize,
    f: &mut dyn FnMut(&mut Vec<Field>, usize),
) -> bool {
    for i in 0..list.len() {
        if *target == 0 {
            f(list, i);
            return true;
        }
        *target -= 1;
        if let Value::Message(c) | Value::Group(c) = &mut list[i].value {
            if visit(c, target, f) {
                return true;
            }
        }
    }
    false
}

fn field_at(list: &[Field], target: &mut usize) -> Option<Field> {
    for f in list {
        if *target == 0 {
            return Some(f.clone());
        }
        *target -= 1;
        if let Value::Message(c) | Value::Group(c) = &f.value {
            if let Some(found) = field_at(c, target) {
                return Some(found);
            }
        }
    }
    None
}

/// Groups nested `depth` deep, numbered `number`.
fn nested_groups(number: u32, depth: u32) -> Field {
    let mut inner = Vec::new();
    for _ in 0..depth.saturating_sub(1) {
        inner = vec![Field {
            number,
            wire_type: None,
            value: Value::Group(inner),
        }];
    }
    Field {
        number,
        wire_type: None,
        value: Value::Group(inner),
    }
}

/// Applies `edit` to `tree`.
pub fn apply(tree: &mut Vec<Field>, edit: &Edit) {
    let n = count(tree);
    if n == 0 {
        if let Edit::Insert {
            number,
            kind,
            depth,
            ..
        } = edit
        {
            tree.push(unknown(*number, *kind, *depth));
        }
        return;
    }
    let graft = match edit {
        Edit::Graft { from, .. } => field_at(tree, &mut (from % n)),
        _ => None,
    };
    let at = match edit {
        Edit::SetVarint { at, .. }
        | Edit::Overlong { at, .. }
        | Edit::Renumber { at, .. }
        | Edit::Retype { at, .. }
        | Edit::Repeat { at }
        | Edit::Drop { at }
        | Edit::SwapNext { at }
        | Edit::Insert { at, .. }
        | Edit::BadUtf8 { at, .. }
        | Edit::Empty { at }
        | Edit::Graft { at, .. } => at % n,
    };
    visit(tree, &mut { at }, &mut |list, i| match edit {
        Edit::SetVarint { pick, .. } => {
            if let Value::Varint { v, .. } = &mut list[i].value {
                *v = match pick % (VARINTS.len() + 2) {
                    k if k < VARINTS.len() => VARINTS[k],
                    k if k == VARINTS.len() => v.wrapping_add(1),
                    _ => v.wrapping_sub(1),
                };
            }
        }
        Edit::Overlong { extra, .. } => {
            if let Value::Varint { extra: e, .. } = &mut list[i].value {
                *e = *extra;
            }
        }
        Edit::Renumber { pick, .. } => {
            let f = &mut list[i];
            f.number = match pick % (NUMBERS.len() + 2) {
                k if k < NUMBERS.len() => NUMBERS[k],
                k if k == NUMBERS.len() => f.number.saturating_add(1).min(0x1fff_ffff),
                _ => f.number.saturating_sub(1),
            };
        }
        Edit::Retype { wire_type, .. } => list[i].wire_type = Some(wire_type & 7),
        Edit::Repeat { .. } => {
            let f = list[i].clone();
            list.insert(i + 1, f);
        }
        Edit::Drop { .. } => {
            list.remove(i);
        }
        Edit::SwapNext { .. } => {
            if i + 1 < list.len() {
                list.swap(i, i + 1);
            }
        }
        Edit::Insert {
            number,
            kind,
            depth,
            ..
        } => list.insert(i, unknown(*number, *kind, *depth)),
        Edit::BadUtf8 { pos, byte, .. } => {
            if let Value::Bytes(b) = &mut list[i].value {
                if !b.is_empty() {
                    let k = pos % b.len();
                    b[k] = *byte;
                }
            }
        }
        Edit::Empty { .. } => match &mut list[i].value {
            Value::Bytes(b) => b.clear(),
            Value::Message(c) | Value::Group(c) => c.clear(),
            _ => {}
        },
        Edit::Graft { .. } => {
            if let Some(g) = graft.clone() {
                list.insert(i, g);
            }
        }
    });
}

/// An unknown field (the number may well be a known one).
fn unknown(number: u32, kind: u8, depth: u32) -> Field {
    let value = match kind % 5 {
        0 => Value::Varint {
            v: u64::from(number),
            extra: 0,
        },
        1 => Value::Fixed64([0x11; 8]),
        2 => Value::Fixed32([0x22; 4]),
        3 => Value::Bytes(b"unknown".to_vec()),
        _ => return nested_groups(number, depth),
    };
    Field {
        number,
        wire_type: None,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{self, Profile};
    use prost::Message;

    #[test]
    fn writes_back_what_it_parsed() {
        let p = Profile {
            series: 20,
            ..Profile::default()
        };
        let raw = loadgen::write_request(&p, "t", 1).encode_to_vec();
        let tree = parse(&raw).expect("a generated body parses");
        let mut out = Vec::new();
        write(&tree, &mut out);
        assert_eq!(out, raw);
    }

    #[test]
    fn edits_keep_the_lengths_right() {
        let mut tree = parse(&[0x0a, 0x04, 0x0a, 0x02, 0x08, 0x05]).expect("nested");
        apply(&mut tree, &Edit::Overlong { at: 2, extra: 2 });
        apply(
            &mut tree,
            &Edit::Insert {
                at: 2,
                number: 9,
                kind: 4,
                depth: 2,
            },
        );
        let mut out = Vec::new();
        write(&tree, &mut out);
        // 1 { 1 { 9 { 9 {} } 1: 5 (3 bytes) } }
        assert_eq!(
            out,
            [0x0a, 0x0a, 0x0a, 0x08, 0x4b, 0x4b, 0x4c, 0x4c, 0x08, 0x85, 0x80, 0x00]
        );
    }
}
