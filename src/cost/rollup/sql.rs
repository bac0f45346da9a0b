//! What the rollup's queries bind: `IN` lists as SQL tuples, kept within
//! ClickHouse's query size whatever the number or length of the keys.
//! Every value goes into a query through the `clickhouse` crate's
//! client-side binding (`query("... ?").bind(x)`, which escapes it; 18.16
//! has no server-side parameters), tables as
//! [`Identifier`](clickhouse::sql::Identifier)s.

use clickhouse::query::Query;
use serde::ser::{Serialize, SerializeTuple, Serializer};

/// Most bytes of string literals in the `IN` lists of one query. ClickHouse
/// refuses queries over `max_query_size` (256 KiB by default) with "Code:
/// 62"; a query holds at most two lists (accounts, namespaces), so it stays
/// well under that whatever the number or length of the keys.
pub const IN_LIST_BUDGET: usize = 64 << 10;

/// Namespace values longer than this are matched by their MD5 in queries
/// (`hex(MD5(namespace))`, 34 bytes of literal), so a tenant's long label
/// values cannot inflate a query.
const HASH_NAMESPACES_OVER: usize = 64;

/// A non-empty list bound as a SQL tuple, `('a','b')`, the form `x IN ?`
/// needs: the crate binds slices as arrays, which `IN` refuses on 18.16.
pub struct InList<'a, T>(pub &'a [T]);

impl<T: Serialize> Serialize for InList<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(self.0.len())?;
        for item in self.0 {
            t.serialize_element(item)?;
        }
        t.end()
    }
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

/// The literal bytes a namespace costs in a [`NamespaceCondition`].
pub fn namespace_weight(ns: &&String) -> usize {
    if ns.len() > HASH_NAMESPACES_OVER {
        35
    } else {
        ns.len() + 3
    }
}

/// `namespace` is one of a set: short values as literals, long ones by MD5.
pub struct NamespaceCondition<'a> {
    short: Vec<&'a String>,
    hashes: Vec<String>,
}

impl<'a> NamespaceCondition<'a> {
    pub fn new(nss: &[&'a String]) -> NamespaceCondition<'a> {
        let (long, short): (Vec<&String>, Vec<&String>) =
            nss.iter().partition(|n| n.len() > HASH_NAMESPACES_OVER);
        let hashes = long
            .iter()
            .map(|n| format!("{:X}", md5::compute(n.as_bytes())))
            .collect();
        NamespaceCondition { short, hashes }
    }

    /// The condition's text, with a `?` for each list [`bind`](Self::bind) binds.
    pub fn sql(&self) -> &'static str {
        match (self.short.is_empty(), self.hashes.is_empty()) {
            (false, true) => "(namespace IN ?)",
            (true, false) => "(hex(MD5(namespace)) IN ?)",
            (false, false) => "(namespace IN ? OR hex(MD5(namespace)) IN ?)",
            (true, true) => "(0)",
        }
    }

    /// Binds the lists, in the order [`sql`](Self::sql) names them.
    pub fn bind(&self, mut q: Query) -> Query {
        if !self.short.is_empty() {
            q = q.bind(InList(&self.short));
        }
        if !self.hashes.is_empty() {
            q = q.bind(InList(&self.hashes));
        }
        q
    }
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
        let cond = NamespaceCondition::new(&[&short, &long]);
        assert_eq!(cond.sql(), "(namespace IN ? OR hex(MD5(namespace)) IN ?)");
        assert_eq!(cond.short, [&short]);
        assert_eq!(
            cond.hashes,
            [format!("{:X}", md5::compute(long.as_bytes()))]
        );
        assert_eq!(NamespaceCondition::new(&[&short]).sql(), "(namespace IN ?)");
    }

    #[test]
    fn values_are_bound_escaped_and_lists_as_tuples() {
        let client = clickhouse::Client::default();
        let q = client
            .query("SELECT ? FROM ? WHERE a IN ? AND b IN ? AND t >= ?")
            .bind("a'b\\c")
            .bind(clickhouse::sql::Identifier("expenses"))
            .bind(InList(&["x", "it's"]))
            .bind(InList(&["one"]))
            .bind(-5i64);
        assert_eq!(
            q.sql_display().to_string(),
            "SELECT 'a\\'b\\\\c' FROM `expenses` WHERE a IN ('x','it\\'s') AND b IN ('one') AND t >= -5"
        );
        let long = "n".repeat(100);
        let short = "web".to_string();
        let cond = NamespaceCondition::new(&[&short, &long]);
        let q = cond.bind(client.query(&format!("SELECT 1 WHERE {}", cond.sql())));
        assert_eq!(
            q.sql_display().to_string(),
            format!(
                "SELECT 1 WHERE (namespace IN ('web') OR hex(MD5(namespace)) IN ('{:X}'))",
                md5::compute(long.as_bytes())
            )
        );
    }
}
