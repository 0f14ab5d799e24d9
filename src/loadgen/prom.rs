//! A strict reader of the Prometheus text exposition format (version 0.0.4), for the server's
//! `GET /metrics`: `collab-load` derives the server-side latency percentiles of a run from it,
//! and the integration tests check every scrape with it.
//!
//! Owns parsing and checking only: it rejects what a Prometheus server would reject or
//! misread (bad names, bad escapes, samples before or outside their family, duplicate series,
//! histograms whose buckets are not cumulative or whose `_count` differs from the `+Inf`
//! bucket), and never panics on any input.

use std::collections::{BTreeMap, HashSet};

/// Why a text is not a valid exposition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct PromError {
    /// 1-based line number (0 for a whole-family check at the end).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// The type a `# TYPE` line gives a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter.
    Counter,
    /// Value that goes up and down.
    Gauge,
    /// `_bucket{le}`, `_sum`, `_count`.
    Histogram,
    /// Quantiles, `_sum`, `_count`.
    Summary,
    /// No `# TYPE` line, or `untyped`.
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Full sample name (`x_bucket` for a histogram's bucket).
    pub name: String,
    /// Labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A metric family: its `# TYPE` and `# HELP` and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Family name.
    pub name: String,
    /// Its type.
    pub kind: Kind,
    /// The `# HELP` text, unescaped (empty without one).
    pub help: String,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

/// Parses and checks a whole exposition.
///
/// # Errors
/// The first violation found, with its line.
pub fn parse(text: &str) -> Result<Vec<Family>, PromError> {
    let mut families: Vec<Family> = Vec::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    for (idx, line) in text.lines().enumerate() {
        let n = idx + 1;
        let err = |reason: String| PromError { line: n, reason };
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // a plain comment
            }
            let name = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            if !is_metric_name(name) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            let family = open_family(&mut families, &mut finished, name).map_err(err)?;
            if keyword == "HELP" {
                if !family.help.is_empty() {
                    return Err(err(format!("second HELP for {name}")));
                }
                family.help = unescape(rest, false).map_err(err)?;
                if family.help.is_empty() {
                    family.help.push(' ');
                }
            } else {
                if family.kind != Kind::Untyped || !family.samples.is_empty() {
                    return Err(err(format!("TYPE for {name} after its samples or twice")));
                }
                family.kind = match rest {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    "histogram" => Kind::Histogram,
                    "summary" => Kind::Summary,
                    "untyped" => Kind::Untyped,
                    other => return Err(err(format!("unknown type {other:?}"))),
                };
            }
            continue;
        }
        let sample = parse_sample(line).map_err(err)?;
        let key = (sample.name.clone(), sorted(&sample.labels));
        if !series.insert(key) {
            return Err(err(format!("duplicate series {line:?}")));
        }
        let belongs = families
            .last()
            .is_some_and(|f| family_of(f, &sample.name).is_some());
        if !belongs {
            if families
                .iter()
                .any(|f| family_of(f, &sample.name).is_some())
            {
                return Err(err(format!(
                    "{} belongs to a family already closed: a family appears twice, not in one group",
                    sample.name
                )));
            }
            // A sample outside the current family starts an untyped one of its own name.
            let family = open_family(&mut families, &mut finished, &sample.name).map_err(err)?;
            family.kind = Kind::Untyped;
        }
        let Some(family) = families.last_mut() else {
            return Err(err("no family".to_owned()));
        };
        check_value(family, &sample).map_err(err)?;
        family.samples.push(sample);
    }
    for family in &families {
        if family.kind == Kind::Histogram {
            check_histogram(family).map_err(|reason| PromError { line: 0, reason })?;
        }
    }
    Ok(families)
}

/// The `q` quantile (0..=1) of histogram family `name`, its buckets summed over every series
/// (as PromQL's `histogram_quantile(q, sum by (le) (...))`): linear within the bucket the rank
/// falls in, the highest finite bound when it falls in `+Inf`. `None` without samples.
pub fn histogram_quantile(families: &[Family], name: &str, q: f64) -> Option<f64> {
    let family = families
        .iter()
        .find(|f| f.name == name && f.kind == Kind::Histogram)?;
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in &family.samples {
        if s.name.strip_suffix("_bucket") != Some(name) {
            continue;
        }
        let le = parse_value(s.label("le")?).ok()?;
        // Ordered by the bound's bits: the bounds are positive, where bit order is value order.
        let entry = buckets.entry(le.to_bits()).or_insert((le, 0.0));
        entry.1 += s.value;
    }
    let bounds: Vec<(f64, f64)> = buckets.into_values().collect();
    let total = bounds.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &bounds {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let in_bucket = count - below;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / in_bucket);
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

fn sorted(labels: &[(String, String)]) -> Vec<(String, String)> {
    let mut labels = labels.to_vec();
    labels.sort();
    labels
}

fn open_family<'a>(
    families: &'a mut Vec<Family>,
    finished: &mut HashSet<String>,
    name: &str,
) -> Result<&'a mut Family, String> {
    let same = families.last().is_some_and(|f| f.name == name);
    if !same {
        if !finished.insert(name.to_owned()) {
            return Err(format!("family {name} appears twice, not in one group"));
        }
        families.push(Family {
            name: name.to_owned(),
            kind: Kind::Untyped,
            help: String::new(),
            samples: Vec::new(),
        });
    }
    families.last_mut().ok_or_else(|| "no family".to_owned())
}

/// The suffix `sample` has within `family` (`""` for the plain name), if it belongs to it.
fn family_of<'a>(family: &Family, sample: &'a str) -> Option<&'a str> {
    let suffix = sample.strip_prefix(family.name.as_str())?;
    let allowed: &[&str] = match family.kind {
        Kind::Histogram => &["_bucket", "_sum", "_count"],
        Kind::Summary => &["", "_sum", "_count"],
        Kind::Counter | Kind::Gauge | Kind::Untyped => &[""],
    };
    allowed.contains(&suffix).then_some(suffix)
}

fn check_value(family: &Family, sample: &Sample) -> Result<(), String> {
    let suffix = family_of(family, &sample.name).unwrap_or("");
    let has_le = sample.label("le").is_some();
    match (family.kind, suffix) {
        (Kind::Histogram, "_bucket") if !has_le => {
            return Err(format!("{} without le", sample.name))
        }
        (Kind::Histogram, "_bucket") => {}
        _ if has_le => return Err(format!("le on {}", sample.name)),
        _ => {}
    }
    let counts = matches!(
        (family.kind, suffix),
        (Kind::Counter, _) | (Kind::Histogram, "_bucket" | "_count") | (Kind::Summary, "_count")
    );
    // NaN is no count either.
    if counts && (sample.value.is_nan() || sample.value < 0.0) {
        return Err(format!("{} must be a non-negative count", sample.name));
    }
    if sample.label("quantile").is_some() && family.kind != Kind::Summary {
        return Err(format!("quantile label on {}", sample.name));
    }
    Ok(())
}

fn check_histogram(family: &Family) -> Result<(), String> {
    #[derive(Default)]
    struct Series {
        buckets: Vec<(f64, f64)>,
        sum: Option<f64>,
        count: Option<f64>,
    }
    let mut all: BTreeMap<Vec<(String, String)>, Series> = BTreeMap::new();
    for s in &family.samples {
        let key = sorted(&s.labels)
            .into_iter()
            .filter(|(k, _)| k != "le")
            .collect();
        let series = all.entry(key).or_default();
        match family_of(family, &s.name) {
            Some("_bucket") => {
                let le = s.label("le").unwrap_or("");
                let bound = parse_value(le).map_err(|e| format!("le {le:?}: {e}"))?;
                series.buckets.push((bound, s.value));
            }
            Some("_sum") => series.sum = Some(s.value),
            Some("_count") => series.count = Some(s.value),
            _ => {
                return Err(format!(
                    "{} is not part of histogram {}",
                    s.name, family.name
                ))
            }
        }
    }
    for (labels, series) in &all {
        let what = format!("{}{labels:?}", family.name);
        for pair in series.buckets.windows(2) {
            // NaN bounds are out of order too.
            if pair[0].0.partial_cmp(&pair[1].0) != Some(std::cmp::Ordering::Less) {
                return Err(format!("{what}: le not strictly increasing"));
            }
            if pair[1].1 < pair[0].1 {
                return Err(format!("{what}: bucket counts are not cumulative"));
            }
        }
        let Some(&(last_le, last_count)) = series.buckets.last() else {
            return Err(format!("{what}: no buckets"));
        };
        if last_le != f64::INFINITY {
            return Err(format!("{what}: no +Inf bucket"));
        }
        match (series.count, series.sum) {
            (Some(count), Some(_)) if count == last_count => {}
            (Some(count), Some(_)) => {
                return Err(format!(
                    "{what}: _count {count} != +Inf bucket {last_count}"
                ))
            }
            _ => return Err(format!("{what}: missing _sum or _count")),
        }
    }
    Ok(())
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Undoes `\\`, `\n` and (in label values) `\"`.
fn unescape(text: &str, quotes: bool) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quotes => out.push('"'),
            other => return Err(format!("bad escape \\{other:?}")),
        }
    }
    Ok(out)
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if text.is_empty()
            || !text
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
        {
            Err(format!("bad number {text:?}"))
        }
        _ => text.parse().map_err(|_| format!("bad number {text:?}")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let key = &rest[..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            let value = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            // The closing quote is the first one not escaped.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in value.char_indices() {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.ok_or("unterminated label value")?;
            if labels.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(format!("label {key} twice"));
            }
            labels.push((key.to_owned(), unescape(&value[..end], true)?));
            rest = &value[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".to_owned());
            }
        }
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected one space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or(""))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP h A latency.\n# TYPE h histogram\n\
        h_bucket{shard=\"0\",le=\"0.001\"} 1\nh_bucket{shard=\"0\",le=\"0.01\"} 3\n\
        h_bucket{shard=\"0\",le=\"+Inf\"} 4\nh_sum{shard=\"0\"} 2.5\nh_count{shard=\"0\"} 4\n\
        h_bucket{shard=\"1\",le=\"0.001\"} 0\nh_bucket{shard=\"1\",le=\"0.01\"} 0\n\
        h_bucket{shard=\"1\",le=\"+Inf\"} 0\nh_sum{shard=\"1\"} 0\nh_count{shard=\"1\"} 0\n\
        # TYPE c_total counter\nc_total{k=\"a\\\"b\"} 7\n";

    #[test]
    fn accepts_a_valid_exposition() {
        let families = parse(GOOD).expect("valid");
        assert_eq!(families.len(), 2);
        assert_eq!(families[0].kind, Kind::Histogram);
        assert_eq!(families[1].samples[0].label("k"), Some("a\"b"));
        let p50 = histogram_quantile(&families, "h", 0.5).expect("samples");
        assert!((p50 - 0.0055).abs() < 1e-12, "{p50}");
        assert_eq!(histogram_quantile(&families, "h", 1.0), Some(0.01));
        assert_eq!(histogram_quantile(&families, "nope", 0.5), None);
    }

    #[test]
    fn rejects_broken_expositions() {
        for (bad, why) in [
            (
                GOOD.replace("le=\"0.01\"} 3", "le=\"0.01\"} 0"),
                "not cumulative",
            ),
            (
                GOOD.replace("h_count{shard=\"0\"} 4", "h_count{shard=\"0\"} 5"),
                "count",
            ),
            (
                GOOD.replace("h_bucket{shard=\"1\",le=\"+Inf\"} 0\n", ""),
                "no +Inf",
            ),
            (GOOD.replace("h_sum{shard=\"1\"} 0\n", ""), "missing _sum"),
            (
                GOOD.replace("le=\"0.01\"} 3", "le=\"0.0001\"} 3"),
                "increasing",
            ),
            (
                GOOD.replace("h_sum{shard=\"0\"}", "h_sum{shard=\"0\",le=\"1\"}"),
                "le on",
            ),
            (
                GOOD.replace("c_total{k=\"a\\\"b\"} 7", "c_total{k=\"a\"} -1"),
                "non-negative",
            ),
            (GOOD.replace("c_total{", "c_total {"), "number"),
            (GOOD.replace("k=\"a", "k=a"), "quoted"),
            (GOOD.replace("a\\\"b", "a\\tb"), "escape"),
            (
                GOOD.replace("c_total{k=\"a\\\"b\"} 7", "c_total{k=\"a\"} 7 x"),
                "timestamp",
            ),
            (
                GOOD.replace("# TYPE c_total counter\n", "") + "# TYPE c_total counter\n",
                "TYPE",
            ),
            (format!("{GOOD}h_count{{shard=\"9\"}} 1\n"), "twice"),
            (format!("{GOOD}c_total{{k=\"a\\\"b\"}} 7\n"), "duplicate"),
            ("9bad 1\n".to_owned(), "metric name"),
            ("x{1a=\"v\"} 1\n".to_owned(), "label name"),
            ("x{a=\"v\",a=\"w\"} 1\n".to_owned(), "twice"),
            ("x{a=\"v\" 1\n".to_owned(), "after a label"),
            ("x 1 2 3\n".to_owned(), "after the timestamp"),
            ("# TYPE x widget\n".to_owned(), "unknown type"),
        ] {
            let error = parse(&bad).expect_err(why);
            assert!(error.reason.contains(why), "{why}: {error}\n{bad}");
        }
    }
}
