//! The text of the rollup's queries: literals, and `IN` lists kept within
//! ClickHouse's query size whatever the number or length of the keys.

/// Most bytes of string literals in the `IN` lists of one query. ClickHouse
/// refuses queries over `max_query_size` (256 KiB by default) with "Code:
/// 62"; a query holds at most two lists (accounts, namespaces), so it stays
/// well under that whatever the number or length of the keys.
pub const IN_LIST_BUDGET: usize = 64 << 10;

/// Namespace values longer than this are matched by their MD5 in queries
/// (`hex(MD5(namespace))`, 34 bytes of literal), so a tenant's long label
/// values cannot inflate a query.
const HASH_NAMESPACES_OVER: usize = 64;

/// A ClickHouse string literal.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '\'' => q.push_str("\\'"),
            _ => q.push(c),
        }
    }
    q.push('\'');
    q
}

pub fn in_list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let v: Vec<String> = items.into_iter().map(|s| quote(s)).collect();
    format!("({})", v.join(","))
}

/// Splits `items` into runs whose literals (`weight` bytes each) add up to at
/// most `budget` bytes; an item heavier than the budget gets a run of its own.
pub fn chunk_by_bytes<T>(items: &[T], budget: usize, weight: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let w = weight(item);
        if i > start && used + w > budget {
            out.push(&items[start..i]);
            (start, used) = (i, 0);
        }
        used += w;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// The literal bytes a namespace costs in [`namespace_condition`].
pub fn namespace_weight(ns: &&String) -> usize {
    if ns.len() > HASH_NAMESPACES_OVER {
        35
    } else {
        ns.len() + 3
    }
}

/// `namespace` is one of `nss`: short values as literals, long ones by MD5.
pub fn namespace_condition(nss: &[&String]) -> String {
    let (long, short): (Vec<&String>, Vec<&String>) =
        nss.iter().partition(|n| n.len() > HASH_NAMESPACES_OVER);
    let mut parts = Vec::new();
    if !short.is_empty() {
        parts.push(format!("namespace IN {}", in_list(short)));
    }
    if !long.is_empty() {
        let hashes: Vec<String> = long
            .iter()
            .map(|n| format!("'{:X}'", md5::compute(n.as_bytes())))
            .collect();
        parts.push(format!("hex(MD5(namespace)) IN ({})", hashes.join(",")));
    }
    format!("({})", parts.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_lists_are_chunked_by_bytes_and_long_namespaces_hashed() {
        let items: Vec<String> = (0..1000).map(|i| format!("{i:0>100}")).collect();
        let chunks = chunk_by_bytes(&items, 1000, |s| s.len() + 3);
        assert!(
            chunks[..chunks.len() - 1].iter().all(|c| c.len() == 9),
            "9 * 103 <= 1000"
        );
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 1000);
        // An item over the budget gets a run of its own; nothing is lost.
        let big = vec!["x".repeat(5000), "a".into(), "b".into()];
        let chunks = chunk_by_bytes(&big, 1000, |s| s.len());
        assert_eq!(chunks.len(), 2);
        assert!(chunk_by_bytes::<String>(&[], 10, |s| s.len()).is_empty());

        let long = "n".repeat(4000);
        let short = "web".to_string();
        let cond = namespace_condition(&[&short, &long]);
        assert!(cond.len() < 120, "{cond}");
        let want = format!("{:X}", md5::compute(long.as_bytes()));
        assert_eq!(
            cond,
            format!("(namespace IN ('web') OR hex(MD5(namespace)) IN ('{want}'))")
        );
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(quote("a'b\\c"), "'a\\'b\\\\c'");
    }
}
