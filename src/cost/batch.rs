//! Shaping a batch of spool records for ClickHouse: series blocks sorted
//! like the raw table, cut into insert parts of bounded size, one month
//! each; which series rows are still to write; and the touched index rows
//! the rollup reads.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::clock::{month_of, DAY_MS};
use crate::cost::clickhouse::{RawRow, TouchedRow};
use crate::cost::names::CHARGED_METRICS;
use crate::cost::record::SeriesBlock;

/// Cuts series blocks into insert parts of rows: each part holds one month,
/// at most `max_rows` rows and about `max_bytes` bytes on the wire (a single
/// row larger than that is a part of its own). Rows are views into the
/// blocks, made only as parts are taken.
///
/// A part also names the blocks its rows come from (a run of them; with
/// samples of several months, some of the run may have no row in it).
pub struct Parts<'b, 'a> {
    blocks: &'b [SeriesBlock<'a>],
    months: Vec<i64>,
    max_rows: usize,
    max_bytes: usize,
    /// Rows in all blocks (to size a part's row vector once).
    total_rows: usize,
    /// (month index, block, sample) of the next row.
    at: (usize, usize, usize),
}

impl<'b, 'a> Parts<'b, 'a> {
    pub fn new(blocks: &'b [SeriesBlock<'a>], max_rows: usize, max_bytes: usize) -> Self {
        // Nearly always one month, at most a few: a short list beats a set,
        // and consecutive samples mostly share a day.
        let mut months: Vec<i64> = Vec::new();
        let mut last_day = None;
        let mut total_rows = 0;
        for b in blocks {
            total_rows += b.len();
            for (t, _) in b.samples() {
                let day = t.div_euclid(DAY_MS);
                if last_day == Some(day) {
                    continue;
                }
                last_day = Some(day);
                let m = month_of(t);
                if !months.contains(&m) {
                    months.push(m);
                }
            }
        }
        months.sort_unstable();
        Parts {
            blocks,
            months,
            max_rows: max_rows.max(1),
            max_bytes,
            total_rows,
            at: (0, 0, 0),
        }
    }

    /// The next part, or `None` when all rows were given out.
    pub fn next_part(&mut self) -> Option<Part<'b, 'a>> {
        let (mut m, mut b, mut i) = self.at;
        let single_month = self.months.len() == 1;
        while m < self.months.len() {
            let month = self.months[m];
            let mut rows = Vec::with_capacity(self.max_rows.min(self.total_rows));
            let mut bytes = 0;
            // The first and last block with a row in `rows`.
            let (mut first, mut last) = (b, b);
            while b < self.blocks.len() {
                let block = &self.blocks[b];
                let size = block.row_bytes();
                while i < block.len() {
                    if single_month || month_of(block.sample(i).0) == month {
                        if !rows.is_empty()
                            && (rows.len() >= self.max_rows || bytes + size > self.max_bytes)
                        {
                            self.at = (m, b, i);
                            return Some(Part {
                                rows,
                                blocks: &self.blocks[first..=last],
                            });
                        }
                        if rows.is_empty() {
                            first = b;
                        }
                        last = b;
                        rows.push(block.row(i));
                        bytes += size;
                    }
                    i += 1;
                }
                b += 1;
                i = 0;
            }
            m += 1;
            b = 0;
            self.at = (m, 0, 0);
            if !rows.is_empty() {
                return Some(Part {
                    rows,
                    blocks: &self.blocks[first..=last],
                });
            }
        }
        self.at = (m, b, i);
        None
    }
}

/// One insert's worth of sample rows, and the series blocks they come from.
pub struct Part<'b, 'a> {
    pub rows: Vec<RawRow<'b>>,
    pub blocks: &'b [SeriesBlock<'a>],
}

/// The series rows the drain has written, with the month (of ingest time)
/// each went into: a series needs a row once per month, so that a month's
/// partitions of the series table hold every series of the same month's
/// samples. Bounded: when full it starts over (a series then gets a second
/// row in the month, which the table's ReplacingMergeTree collapses).
#[derive(Default)]
pub struct SeenSeries {
    months: HashMap<u64, i64, HashedKeys>,
}

/// Series rows the drain remembers (about 36 MiB when full).
const SEEN_SERIES_MAX: usize = 1 << 20;

impl SeenSeries {
    pub fn needs_row(&self, key: u64, month: i64) -> bool {
        self.months.get(&key) != Some(&month)
    }

    pub fn wrote_row(&mut self, key: u64, month: i64) {
        if self.months.len() >= SEEN_SERIES_MAX && !self.months.contains_key(&key) {
            self.months.clear();
        }
        self.months.insert(key, month);
    }
}

/// The series of `series` that `rows` hold samples of.
pub fn series_of<'b, 'a>(
    series: &[&'b SeriesBlock<'a>],
    rows: &[RawRow<'_>],
) -> Vec<&'b SeriesBlock<'a>> {
    let ids: HashSet<u64, HashedKeys> = rows.iter().map(|r| r.series_id).collect();
    series
        .iter()
        .copied()
        .filter(|b| ids.contains(&b.series_id))
        .collect()
}

/// The distinct (minute, charged metric, account, hour) of a batch.
pub fn touched_rows(rows: &[RawRow<'_>], now: u32) -> Vec<TouchedRow> {
    let minute = now - now % 60;
    let mut set = std::collections::BTreeSet::new();
    let mut last = None;
    for r in rows {
        let hour = (r.ts.div_euclid(3_600_000) * 3600).clamp(0, u32::MAX as i64) as u32;
        let key = (r.metric, r.account, hour);
        // Rows come in runs of one series: most are the key just seen.
        if last == Some(key) {
            continue;
        }
        last = Some(key);
        if CHARGED_METRICS.contains(&r.metric) {
            set.insert(key);
        }
    }
    set.into_iter()
        .map(|(metric, account, hour)| TouchedRow {
            ingest_minute: minute,
            metric: metric.to_string(),
            account: account.to_string(),
            hour,
        })
        .collect()
}

/// Orders series blocks as the raw table orders rows (account, metric,
/// series id, then time), so that inserted rows arrive sorted: ClickHouse
/// checks whether an inserted block is already in key order and then skips
/// sorting it and permuting every column (a large share of its insert
/// CPU; 18.16 does the check too). Rows out of order (a series whose
/// samples overlap across records) are only slower, never wrong: ClickHouse
/// sorts them.
///
/// A batch holds each series many times (once per request), so blocks are
/// grouped by series (one hash lookup each), the few distinct series are
/// sorted (strings ranked once per distinct value, so the sort compares
/// numbers), and each group is put in time order (already so, as a rule).
pub fn sort_like_raw_table<'a>(blocks: &mut Vec<SeriesBlock<'a>>) {
    // Strings by their XXH3 (a collision only misorders, never loses).
    let id = |s: &str| xxhash_rust::xxh3::xxh3_64(s.as_bytes());
    let mut group_of: HashMap<u64, u32, HashedKeys> = HashMap::default();
    let mut group: Vec<u32> = Vec::with_capacity(blocks.len());
    // Per group: its first block (for the group's key) and its size.
    let mut groups: Vec<(usize, u32)> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        let g = *group_of.entry(b.key).or_insert_with(|| {
            groups.push((i, 0));
            (groups.len() - 1) as u32
        });
        groups[g as usize].1 += 1;
        group.push(g);
    }
    let mut names: HashMap<u64, &'a str, HashedKeys> = HashMap::default();
    for &(first, _) in &groups {
        let b = &blocks[first];
        names.entry(id(b.account)).or_insert(b.account);
        names.entry(id(b.metric)).or_insert(b.metric);
    }
    let mut sorted: Vec<(&'a str, u64)> = names.into_iter().map(|(h, s)| (s, h)).collect();
    sorted.sort_unstable();
    let rank: HashMap<u64, u32, HashedKeys> = sorted
        .into_iter()
        .enumerate()
        .map(|(i, (_, h))| (h, i as u32))
        .collect();
    let mut order: Vec<u32> = (0..groups.len() as u32).collect();
    order.sort_unstable_by_key(|&g| {
        let b = &blocks[groups[g as usize].0];
        (
            rank[&id(b.account)],
            rank[&id(b.metric)],
            b.series_id,
            b.key,
        )
    });
    // Where each group starts in the output.
    let mut start = vec![0usize; groups.len()];
    let mut at = 0;
    for &g in &order {
        start[g as usize] = at;
        at += groups[g as usize].1 as usize;
    }
    let mut out: Vec<Option<SeriesBlock<'a>>> = vec![None; blocks.len()];
    for (b, g) in blocks.drain(..).zip(group) {
        let slot = &mut start[g as usize];
        out[*slot] = Some(b);
        *slot += 1;
    }
    blocks.extend(out.into_iter().flatten());
    // Each group in time order: a stable sort of a run already in order
    // is one pass.
    let mut at = 0;
    for &g in &order {
        let n = groups[g as usize].1 as usize;
        blocks[at..at + n].sort_by_key(|b| b.samples().next().map_or(i64::MIN, |(ts, _)| ts));
        at += n;
    }
}

/// Hash maps keyed by 64-bit hashes (series keys, XXH3 of strings): the
/// key is its own hash (SipHash, the default, showed in profiles).
pub type HashedKeys = BuildHasherDefault<KeyIsHash>;

#[derive(Default)]
pub struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    /// Not used by the `u64` keys above; mixes bytes in for completeness.
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::record::{decode_record, Accepted, RecordBuilder};

    const METRIC: &[u8] = b"cloudtuner_kubecost_namespace_total_cost";

    fn all_rows<'b>(blocks: &'b [SeriesBlock<'_>]) -> Vec<RawRow<'b>> {
        let mut parts = Parts::new(blocks, usize::MAX, usize::MAX);
        let mut rows = Vec::new();
        while let Some(p) = parts.next_part() {
            assert!(p
                .rows
                .iter()
                .all(|r| p.blocks.iter().any(|b| b.series_id == r.series_id)));
            rows.extend(p.rows);
        }
        rows
    }

    /// Rows reach ClickHouse in the raw table's key order (account, metric,
    /// series id, time) whatever the order of requests and series.
    #[test]
    fn batches_are_sorted_like_the_raw_table() {
        let mut records = Vec::new();
        for (account, ts) in [("acc-b", 20), ("acc-a", 30), ("acc-b", 10), ("acc-a", 10)] {
            let mut b = RecordBuilder::new(Accepted::ANY);
            for (metric, ns) in [
                (&b"cloudtuner_kubecost_pod_cost"[..], b"z"),
                (b"cloudtuner_kubecost_node_cost", b"a"),
                (b"cloudtuner_kubecost_pod_cost", b"a"),
                (b"cloudtuner_kubecost_node_cost", b"m"),
            ] {
                b.begin_series(account, metric, &[(b"namespace", ns)]);
                b.sample(ts, 1.0);
                b.sample(ts + 1, 2.0);
            }
            records.push(b.finish().payload().to_vec());
        }
        let mut blocks = Vec::new();
        for r in &records {
            decode_record(r, &mut blocks).unwrap();
        }
        sort_like_raw_table(&mut blocks);
        let rows = all_rows(&blocks);
        assert_eq!(rows.len(), 32);
        let keys: Vec<_> = rows
            .iter()
            .map(|r| (r.account, r.metric, r.series_id, r.ts))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys[0].0, "acc-a");
        assert_eq!(keys[0].1, "cloudtuner_kubecost_node_cost");
    }

    /// One 32 KB request (one series, 60 labels of 4 KiB, 4,000 samples)
    /// used to expand to ~1 GB of rows in the drain at once; now a sample
    /// row holds no labels (its series row does, once), and parts are one
    /// month each and bounded in (wire) bytes.
    #[test]
    fn parts_bound_rows_by_bytes_and_split_by_month() {
        let names: Vec<String> = (0..60).map(|i| format!("l{i:02}")).collect();
        let value = "a".repeat(4096);
        let labels: Vec<(&[u8], &[u8])> = names
            .iter()
            .map(|n| (n.as_bytes(), value.as_bytes()))
            .collect();
        let feb_end = 1_709_251_200_000 - 2_000;
        let mut b = RecordBuilder::new(Accepted::ANY);
        b.begin_series("acc", METRIC, &labels);
        for i in 0..4000 {
            b.sample(feb_end + i, 1.0);
        }
        let rec = b.finish();
        assert!(rec.payload().len() < 400_000, "{}", rec.payload().len());
        let mut blocks = Vec::new();
        decode_record(rec.payload(), &mut blocks).unwrap();
        let row = blocks[0].row_bytes();
        assert!(row < 200, "{row}");
        assert_eq!(blocks[0].labels().len(), 60);
        let max_bytes = 8 << 10;
        let mut parts = Parts::new(&blocks, 200_000, max_bytes);
        let (mut n, mut count) = (0, 0);
        let mut months = Vec::new();
        while let Some(p) = parts.next_part() {
            let p = p.rows;
            assert!(
                p.len() * row <= max_bytes,
                "{} rows of {row} bytes",
                p.len()
            );
            let m = month_of(p[0].ts);
            assert!(p.iter().all(|r| month_of(r.ts) == m), "one month per part");
            months.push(m);
            n += p.len();
            count += 1;
        }
        assert_eq!(n, 4000);
        assert!(months.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(months.first(), Some(&(2024 * 12 + 1)));
        assert_eq!(months.last(), Some(&(2024 * 12 + 2)));
        assert!(count >= 4000 * row / max_bytes, "{count}");
        // The row-count bound holds as well.
        let mut parts = Parts::new(&blocks, 7, usize::MAX);
        while let Some(p) = parts.next_part() {
            assert!(p.rows.len() <= 7);
        }
    }

    #[test]
    fn a_series_row_is_needed_once_per_month() {
        let mut seen = SeenSeries::default();
        assert!(seen.needs_row(1, 100));
        seen.wrote_row(1, 100);
        assert!(!seen.needs_row(1, 100));
        assert!(seen.needs_row(2, 100));
        assert!(seen.needs_row(1, 101), "a new month needs the row again");
        seen.wrote_row(1, 101);
        assert!(!seen.needs_row(1, 101));
        // Bounded: full, it starts over rather than grow.
        for k in 0..SEEN_SERIES_MAX as u64 + 10 {
            seen.wrote_row(k, 101);
        }
        assert!(seen.months.len() <= SEEN_SERIES_MAX);
        assert!(!seen.needs_row(SEEN_SERIES_MAX as u64 + 9, 101));
    }

    #[test]
    fn touched_rows_are_distinct_per_charged_metric_account_and_hour() {
        let row = |metric, account, ts| RawRow {
            account,
            metric,
            cluster: "",
            namespace: "",
            pod: "",
            series_id: 0,
            ts,
            value: 1.0,
            ingest_time: 0,
        };
        let ns = crate::cost::names::NAMESPACE_METRIC;
        let rows = [
            row(ns, "a", 0),
            row(ns, "a", 1),
            row(ns, "b", 2),
            row(ns, "a", 3),
            row(ns, "a", 3_600_000),
            row("cloudtuner_kubecost_namespace_cpu_cost", "a", 0),
        ];
        let t = touched_rows(&rows, 125);
        let keys: Vec<_> = t
            .iter()
            .map(|r| (r.ingest_minute, r.account.as_str(), r.hour))
            .collect();
        assert_eq!(keys, [(120, "a", 0), (120, "a", 3600), (120, "b", 0)]);
    }
}
