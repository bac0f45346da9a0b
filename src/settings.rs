//! How settings get their values: one loader, one precedence. Later sources
//! win, setting by setting:
//!
//! 1. the defaults of the tree (`config.rs`);
//! 2. the config file (TOML);
//! 3. `RWGATE_<PATH>` environment variables: one per setting, the path in
//!    upper case with dots as underscores (`RWGATE_AUTH_REST_URL`);
//! 4. the command line: `--set PATH=VALUE` in the order given, then the
//!    named flags (`--rest-url X` is `--set auth.rest_url=X`).
//!
//! The list of settings comes from the serde tree itself ([`all`]), so a new
//! field of `Config` can be set every way without code here. A value given as
//! text (environment, `--set`, a flag) takes the type of its setting:
//! `clickhouse.database=2024` is the name "2024", `limits.max_connections=2024`
//! the number, and an empty value unsets an optional setting. figment merges
//! the sources and knows which one a bad value came from.

use std::cell::RefCell;
use std::path::Path;

use figment::value::{Dict, Empty, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::{self, Deserialize, Deserializer, IntoDeserializer, Visitor};

use crate::config::{Config, ConfigError};

/// One setting of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Dotted path, as in the config file: `auth.rest_url`.
    pub path: String,
    /// What its values look like.
    pub kind: Kind,
    /// Unset by default and unsettable (an `Option`).
    pub optional: bool,
}

/// The type of a setting's value, as far as text input and error messages
/// need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    /// A whole number from `min` to `max` (the range of its Rust type).
    Integer {
        min: i64,
        max: u64,
    },
    Float,
    /// Text, including addresses and paths.
    Text,
    /// A duration: `30s`, `1h 30m`.
    Duration,
    /// A byte size: `1048576` or `16MiB`.
    Size,
    /// A list of text: `a,b` or a TOML array.
    List,
    /// One of these names.
    Choice(&'static [&'static str]),
    /// A value of any type (what a type that decides by itself asks for;
    /// no setting of the tree is one).
    Any,
}

impl Kind {
    /// What a value of this kind looks like, in the words of the error
    /// messages (which never name Rust types).
    pub fn expected(self) -> String {
        match self {
            Kind::Bool => "true or false".into(),
            Kind::Integer { min, max } => format!("a whole number from {min} to {max}"),
            Kind::Float => "a number, such as 0.5".into(),
            Kind::Text => "a string".into(),
            Kind::Duration => crate::config::DURATION_EXPECTED.into(),
            Kind::Size => crate::config::SIZE_EXPECTED.into(),
            Kind::List => "a list: a,b or [\"a\", \"b\"]".into(),
            Kind::Choice([one, other]) => format!("\"{one}\" or \"{other}\""),
            Kind::Choice(names) => format!(
                "one of {}",
                names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Kind::Any => "a value".into(),
        }
    }
}

impl Setting {
    /// Its environment variable.
    pub fn env_name(&self) -> String {
        env_name(&self.path)
    }
}

/// The environment variable of a setting path: `limits.max_body_bytes` ->
/// `RWGATE_LIMITS_MAX_BODY_BYTES`.
pub fn env_name(path: &str) -> String {
    format!("RWGATE_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Every setting of the tree, in the order of the config file.
pub fn all() -> Vec<Setting> {
    fn walk(prefix: &mut Vec<&'static str>, out: &mut Vec<Setting>) {
        let Some(Shape::Section(fields)) = probe(prefix) else {
            return;
        };
        for field in fields {
            prefix.push(field);
            match probe(prefix) {
                Some(Shape::Section(_)) => walk(prefix, out),
                Some(Shape::Leaf(kind, optional)) => out.push(Setting {
                    path: prefix.join("."),
                    kind,
                    optional,
                }),
                None => {}
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), &mut out);
    out
}

/// The setting at `path`, if there is one.
pub fn find(path: &str) -> Option<Setting> {
    all().into_iter().find(|s| s.path == path)
}

/// A value given as text for one setting, and where it came from (an
/// environment variable's name, `--set`, a flag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub path: String,
    pub raw: String,
    pub origin: String,
}

/// Environment variables of earlier releases and the setting each set.
const RENAMED_ENV: &[(&str, &str)] = &[
    ("RWGATE_AUTH", "auth.mode"),
    ("RWGATE_REST_URL", "auth.rest_url"),
    ("RWGATE_CLUSTER_SECRET_FILE", "auth.cluster_secret_file"),
    ("RWGATE_TENANTS_FILE", "auth.tenants_file"),
    ("RWGATE_ALLOWLIST", "filter.allowlist"),
    ("RWGATE_TENANT_LABELS", "tenancy.labels"),
    ("RWGATE_MAX_BODY_BYTES", "limits.max_body_bytes"),
    ("RWGATE_MAX_DECODED_BYTES", "limits.max_decoded_bytes"),
    (
        "RWGATE_MAX_CONCURRENT_REQUESTS",
        "limits.max_concurrent_requests",
    ),
    (
        "RWGATE_TENANT_SAMPLES_PER_SEC",
        "limits.tenant_samples_per_sec",
    ),
    ("RWGATE_SHUTDOWN_GRACE", "limits.shutdown_grace"),
    ("RWGATE_ROLLUP", "rollup.enabled"),
    ("RWGATE_EXPENSE_GRAIN", "rollup.grain"),
    ("RWGATE_CHARGE", "rollup.charge"),
];

/// The `RWGATE_<PATH>` values `lookup` (the environment) holds. Other
/// `RWGATE_*` names are not read (Kubernetes sets `RWGATE_SERVICE_HOST` and
/// the like for a Service named rwgate), except the names of an earlier
/// release, which are refused so that no setting is silently lost.
pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Vec<Given>, ConfigError> {
    for (old, path) in RENAMED_ENV {
        if lookup(old).is_some() {
            return Err(ConfigError::Renamed {
                old,
                new: env_name(path),
            });
        }
    }
    Ok(all()
        .into_iter()
        .filter_map(|s| {
            let name = s.env_name();
            lookup(&name).map(|raw| Given {
                path: s.path,
                raw,
                origin: name,
            })
        })
        .collect())
}

/// Reads and parses a config file, applies `given` over it, and checks the
/// result with `check` (validation): a [`ConfigError::Invalid`] of a
/// setting a source gave names that source, as a [`ConfigError::Setting`].
pub fn load(
    file: Option<&Path>,
    given: &[Given],
    check: impl FnOnce(&Config) -> Result<(), ConfigError>,
) -> Result<Config, ConfigError> {
    let file = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Some((text, path.display().to_string()))
        }
        None => None,
    };
    let (config, sources) = merged(
        file.as_ref()
            .map(|(text, origin)| (text.as_str(), origin.as_str())),
        given,
    )?;
    check(&config).map_err(|e| match e {
        ConfigError::Invalid { field, message } => {
            match sources.iter().rev().find(|s| s.written(field).is_some()) {
                // The value is not repeated: the message shows it if it helps.
                Some(source) => ConfigError::Setting {
                    setting: field.to_string(),
                    value: None,
                    origin: source.origin.clone(),
                    message,
                },
                None => ConfigError::Invalid { field, message },
            }
        }
        other => other,
    })?;
    Ok(config)
}

/// A config file's text (`origin` names it in errors), without overrides.
pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
    load_text(Some((text, origin)), &[])
}

/// The tree from a config file's text (if any) and `given` over it, in order.
pub fn load_text(file: Option<(&str, &str)>, given: &[Given]) -> Result<Config, ConfigError> {
    merged(file, given).map(|(config, _)| config)
}

/// [`load_text`], and the sources it merged.
fn merged(
    file: Option<(&str, &str)>,
    given: &[Given],
) -> Result<(Config, Vec<Source>), ConfigError> {
    let settings = all();
    let mut sources = Vec::new();
    if let Some((text, origin)) = file {
        let dict: Dict = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: toml_message(text, &e),
        })?;
        let origin = format!("config file {origin}");
        let tree = Value::from(dict.clone());
        for s in &settings {
            if let Some(Value::String(_, v)) = tree.find_ref(&s.path) {
                if v.trim().is_empty() && !s.optional && s.kind != Kind::List {
                    return Err(ConfigError::Setting {
                        setting: s.path.clone(),
                        value: Some(v.clone()),
                        origin,
                        message: EMPTY.into(),
                    });
                }
            }
        }
        sources.push(Source {
            origin,
            dict,
            given: None,
        });
    }
    for g in given {
        let setting =
            settings
                .iter()
                .find(|s| s.path == g.path)
                .ok_or_else(|| ConfigError::Setting {
                    setting: g.path.clone(),
                    value: None,
                    origin: g.origin.clone(),
                    message: "no such setting (`rwgate check-config` prints them all)".into(),
                })?;
        let value = typed(setting, &g.raw).map_err(|message| ConfigError::Setting {
            setting: g.path.clone(),
            value: Some(g.raw.clone()),
            origin: g.origin.clone(),
            message,
        })?;
        let Value::Dict(_, dict) = figment::util::nest(&g.path, value) else {
            unreachable!("a dotted path nests into a dict");
        };
        sources.push(Source {
            origin: g.origin.clone(),
            dict,
            given: Some((g.path.clone(), g.raw.clone())),
        });
    }
    let figment = sources
        .iter()
        .fold(Figment::new(), |f, source| f.merge(source));
    let config = figment
        .extract()
        .map_err(|e| explain(&e, &settings, &sources))?;
    Ok((config, sources))
}

/// What an empty value of a setting that must have one is told.
const EMPTY: &str = "must not be empty";

/// A figment error as a [`ConfigError::Setting`]: the setting, the value
/// as it was written in the source that gave it, and what the setting
/// takes in words (from its [`Kind`], never serde's Rust type names).
fn explain(e: &figment::Error, settings: &[Setting], sources: &[Source]) -> ConfigError {
    use figment::error::Kind as K;
    let path = e.path.join(".");
    let origin = e
        .metadata
        .as_ref()
        .map_or_else(|| "defaults".to_string(), |m| m.name.to_string());
    // The setting the error is in (an error inside a list names an item).
    let setting = settings
        .iter()
        .filter(|s| path == s.path || path.starts_with(&format!("{}.", s.path)))
        .max_by_key(|s| s.path.len());
    let section = !path.is_empty()
        && settings
            .iter()
            .any(|s| s.path.starts_with(&format!("{path}.")));
    let expected = match (setting, section) {
        (Some(s), _) => format!("expected {}", s.kind.expected()),
        (None, true) => format!("expected a section [{path}]"),
        (None, false) => format!("expected {}", Kind::Any.expected()),
    };
    let message = match &e.kind {
        K::UnknownField(_, known) => {
            let section = path.rsplit_once('.').map_or("the top level", |(s, _)| s);
            return ConfigError::Setting {
                setting: path.clone(),
                value: None,
                origin,
                message: format!("no such setting; {section} has {}", known.join(", ")),
            };
        }
        K::InvalidType(..) | K::InvalidValue(..) | K::InvalidLength(..) | K::UnknownVariant(..) => {
            expected
        }
        // Custom messages of the tree's own types (sizes, addresses).
        K::Message(m) => m.replace('\n', " "),
        other => other.to_string(),
    };
    let path = setting.map_or(path, |s| s.path.clone());
    let value = sources
        .iter()
        .rev()
        .filter(|s| s.origin == origin)
        .find_map(|s| s.written(&path));
    ConfigError::Setting {
        setting: if path.is_empty() {
            "config".into()
        } else {
            path
        },
        value,
        origin,
        message,
    }
}

/// A TOML syntax error in one line, with its position.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// `raw` as a value of `setting`'s type.
fn typed(setting: &Setting, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return match setting.kind {
            _ if setting.optional => Ok(Value::from(Empty::None)),
            // The empty list; its rules are the validation's.
            Kind::List => Ok(Value::from(Vec::<Value>::new())),
            _ => Err(EMPTY.into()),
        };
    }
    let expected = || format!("expected {}", setting.kind.expected());
    let integer = |raw: &str| -> Option<Value> {
        let digits = raw.replace('_', "");
        digits
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| digits.parse::<i64>().map(Value::from))
            .ok()
    };
    // A quoted TOML string is that string (`"4ms"` is 4ms).
    let text = || quoted(raw).unwrap_or_else(|| raw.to_string());
    match setting.kind {
        // Their own deserializers check durations and sizes.
        Kind::Text | Kind::Duration => Ok(Value::from(text())),
        Kind::Size => Ok(integer(raw).unwrap_or_else(|| Value::from(text()))),
        Kind::Bool => match raw {
            "true" => Ok(Value::from(true)),
            "false" => Ok(Value::from(false)),
            _ => Err(expected()),
        },
        // Its range is checked by its deserializer.
        Kind::Integer { .. } => integer(raw).ok_or_else(expected),
        Kind::Float => raw.parse::<f64>().map(Value::from).map_err(|_| expected()),
        Kind::Choice(names) => {
            let text = text();
            if names.contains(&text.as_str()) {
                Ok(Value::from(text))
            } else {
                Err(expected())
            }
        }
        Kind::Any => Ok(integer(raw).unwrap_or_else(|| Value::from(raw.to_string()))),
        Kind::List if raw.starts_with('[') => toml::from_str::<Dict>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .ok_or_else(expected),
        Kind::List => Ok(Value::from(
            raw.split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| Value::from(s.to_string()))
                .collect::<Vec<Value>>(),
        )),
    }
}

/// The string a TOML basic or literal string (`"a"`, `'a'`) stands for.
fn quoted(raw: &str) -> Option<String> {
    if !(raw.starts_with('"') || raw.starts_with('\'')) {
        return None;
    }
    let mut t = toml::from_str::<toml::Table>(&format!("v = {raw}")).ok()?;
    match t.remove("v")? {
        toml::Value::String(s) => Some(s),
        _ => None,
    }
}

/// One source of values for figment, named for error messages.
struct Source {
    origin: String,
    dict: Dict,
    /// The one setting an environment variable, `--set` or a flag gave,
    /// and its text.
    given: Option<(String, String)>,
}

impl Source {
    /// The value at `path` as it was written: the text given, or the
    /// config file's value (a string without its quotes).
    fn written(&self, path: &str) -> Option<String> {
        if let Some((setting, raw)) = &self.given {
            return (setting == path).then(|| raw.clone());
        }
        match Value::from(self.dict.clone()).find(path)? {
            Value::String(_, s) => Some(s),
            other => toml::Value::try_from(&other).ok().map(|v| v.to_string()),
        }
    }
}

impl Provider for &Source {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.origin.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

// ---------------------------------------------------------------------------
// The list of settings, read off `Config`'s `Deserialize`: serde offers no
// reflection, so a deserializer that only follows one path into the tree
// reports what it finds there (a section's field names, or the kind of value
// a leaf asks for) and then gives up.
// ---------------------------------------------------------------------------

/// What sits at a path of the tree.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Section(&'static [&'static str]),
    Leaf(Kind, bool),
}

/// What `Config` asks for at `path`; `None` if `path` is not in the tree.
fn probe(path: &[&'static str]) -> Option<Shape> {
    let found = RefCell::new(None);
    let _ = Config::deserialize(Probe {
        rest: path,
        optional: false,
        found: &found,
    });
    found.into_inner()
}

struct Probe<'a> {
    /// The part of the path still to follow.
    rest: &'a [&'static str],
    /// An `Option` was passed on the way.
    optional: bool,
    found: &'a RefCell<Option<Shape>>,
}

/// The probe's error: it ends every deserialization it starts.
#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Stop {
        Stop
    }
}

impl Probe<'_> {
    fn leaf<T>(self, kind: Kind) -> Result<T, Stop> {
        if self.rest.is_empty() {
            *self.found.borrow_mut() = Some(Shape::Leaf(kind, self.optional));
        }
        Err(Stop)
    }
}

/// A map of at most one entry: the next key of the path, its value probed.
struct OneEntry<'a> {
    key: Option<&'static str>,
    value: Option<Probe<'a>>,
}

impl<'de> de::MapAccess<'de> for OneEntry<'_> {
    type Error = Stop;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        match self.value.take() {
            Some(probe) => seed.deserialize(probe),
            None => Err(Stop),
        }
    }
}

/// `deserialize_*` methods that end the path at a value of one kind; the
/// arguments in brackets are those the method takes before its visitor.
macro_rules! leaves {
    ($($method:ident $(($($arg:ident: $ty:ty),+))? => $kind:expr),+ $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, $($($arg: $ty,)+)? _: V) -> Result<V::Value, Stop> {
            self.leaf($kind)
        }
    )+};
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.rest.split_first() {
            None => {
                *self.found.borrow_mut() = Some(Shape::Section(fields));
                Err(Stop)
            }
            Some((key, rest)) => visitor.visit_map(OneEntry {
                key: Some(key),
                value: Some(Probe {
                    rest,
                    optional: false,
                    found: self.found,
                }),
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(Probe {
            optional: true,
            ..self
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match name {
            crate::config::DURATION_MARKER => self.leaf(Kind::Duration),
            crate::config::SIZE_MARKER => self.leaf(Kind::Size),
            _ => visitor.visit_newtype_struct(self),
        }
    }

    leaves! {
        deserialize_enum(_name: &'static str, variants: &'static [&'static str]) => Kind::Choice(variants),
        deserialize_unit_struct(_name: &'static str) => Kind::Any,
        deserialize_tuple(_len: usize) => Kind::List,
        deserialize_tuple_struct(_name: &'static str, _len: usize) => Kind::List,
        deserialize_bool => Kind::Bool,
        deserialize_i8 => Kind::Integer { min: i8::MIN as i64, max: i8::MAX as u64 },
        deserialize_i16 => Kind::Integer { min: i16::MIN as i64, max: i16::MAX as u64 },
        deserialize_i32 => Kind::Integer { min: i32::MIN as i64, max: i32::MAX as u64 },
        deserialize_i64 => Kind::Integer { min: i64::MIN, max: i64::MAX as u64 },
        deserialize_i128 => Kind::Integer { min: i64::MIN, max: i64::MAX as u64 },
        deserialize_u8 => Kind::Integer { min: 0, max: u8::MAX as u64 },
        deserialize_u16 => Kind::Integer { min: 0, max: u16::MAX as u64 },
        deserialize_u32 => Kind::Integer { min: 0, max: u32::MAX as u64 },
        deserialize_u64 => Kind::Integer { min: 0, max: u64::MAX },
        deserialize_u128 => Kind::Integer { min: 0, max: u64::MAX },
        deserialize_f32 => Kind::Float,
        deserialize_f64 => Kind::Float,
        deserialize_char => Kind::Text,
        deserialize_str => Kind::Text,
        deserialize_string => Kind::Text,
        deserialize_bytes => Kind::Text,
        deserialize_byte_buf => Kind::Text,
        deserialize_identifier => Kind::Text,
        deserialize_seq => Kind::List,
        deserialize_map => Kind::Any,
        deserialize_unit => Kind::Any,
        deserialize_any => Kind::Any,
        deserialize_ignored_any => Kind::Any,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthMode, Size};
    use std::time::Duration;

    fn given(path: &str, raw: &str) -> Given {
        Given {
            path: path.into(),
            raw: raw.into(),
            origin: "--set".into(),
        }
    }

    #[test]
    fn the_list_is_read_off_the_tree() {
        let all = all();
        let kind = |p: &str| {
            all.iter()
                .find(|s| s.path == p)
                .map(|s| (s.kind, s.optional))
                .unwrap_or_else(|| panic!("{p} missing"))
        };
        for (path, want) in [
            ("listen", (Kind::Text, false)),
            ("auth.rest_url", (Kind::Text, true)),
            ("auth.tenants_file", (Kind::Text, true)),
            ("upstream.tls.ca", (Kind::Text, true)),
            (
                "limits.max_series_per_request",
                (
                    Kind::Integer {
                        min: 0,
                        max: u64::MAX,
                    },
                    false,
                ),
            ),
            (
                "limits.tenant_samples_per_sec",
                (
                    Kind::Integer {
                        min: 0,
                        max: u32::MAX.into(),
                    },
                    false,
                ),
            ),
            ("limits.tenant_max_concurrent_share", (Kind::Float, false)),
            ("limits.max_body_bytes", (Kind::Size, false)),
            ("auth.cache_ttl", (Kind::Duration, false)),
            ("tls.reload_interval", (Kind::Duration, false)),
            ("tenancy.labels", (Kind::List, false)),
            ("rollup.enabled", (Kind::Bool, false)),
            (
                "auth.mode",
                (Kind::Choice(&["rest", "static", "none"]), false),
            ),
        ] {
            assert_eq!(kind(path), want, "{path}");
        }
        assert!(!all.iter().any(|s| s.kind == Kind::Any), "{all:?}");
        // Sections are not settings.
        assert!(!all
            .iter()
            .any(|s| s.path == "upstream.tls" || s.path == "auth"));
        // Every leaf the default tree serializes is listed, and nothing else
        // (the optional settings that are unset by default serialize as null).
        let mut serialized = Vec::new();
        leaves(
            "",
            &serde_json::to_value(Config::default()).unwrap(),
            &mut serialized,
        );
        let listed: Vec<String> = all.iter().map(|s| s.path.clone()).collect();
        serialized.sort();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(sorted, serialized);
    }

    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&p, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    /// Every duration in the tree prints the way it was written: the
    /// settings whose default prints as a duration, each set to `365days`.
    #[test]
    fn every_duration_prints_as_written() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let at = |v: &serde_json::Value, path: &str| {
            path.split('.')
                .fold(v.clone(), |v, key| v.get(key).cloned().unwrap_or_default())
        };
        let durations: Vec<String> = all()
            .into_iter()
            .map(|s| s.path)
            .filter(|p| {
                at(&defaults, p)
                    .as_str()
                    .is_some_and(|v| humantime::parse_duration(v).is_ok())
            })
            .collect();
        assert!(durations.len() > 20, "{durations:?}");
        let set: Vec<Given> = durations.iter().map(|p| given(p, "365days")).collect();
        let printed = serde_json::to_value(load_text(None, &set).unwrap()).unwrap();
        for p in &durations {
            assert_eq!(at(&printed, p), "365d", "{p}");
        }
    }

    #[test]
    fn values_take_the_type_of_their_setting() {
        let c = load_text(
            None,
            &[
                given("clickhouse.database", "2024"),
                given("clickhouse.user", "1"),
                given("filter.allowlist", "true"),
                given("limits.max_connections", "2_024"),
                given("limits.max_body_bytes", "2MiB"),
                given("limits.max_decoded_bytes", "4194304"),
                given("tenancy.labels", "[\"x\", \"y\"]"),
                given("auth.negative_cache_ttl", "1h 30m"),
                given("spool.commit_delay", "\"4ms\""),
            ],
        )
        .unwrap();
        assert_eq!(c.clickhouse.database, "2024");
        assert_eq!(c.clickhouse.user.as_deref(), Some("1"));
        assert_eq!(c.filter.allowlist, "true");
        assert_eq!(c.limits.max_connections, 2024);
        assert_eq!(c.limits.max_body_bytes, Size(2 << 20));
        assert_eq!(c.limits.max_decoded_bytes, Size(4 << 20));
        assert_eq!(c.tenancy.labels, ["x", "y"]);
        assert_eq!(c.auth.negative_cache_ttl, Duration::from_secs(5400));
        assert_eq!(c.spool.commit_delay, Duration::from_millis(4));

        for (path, raw, want) in [
            ("limits.max_connections", "many", "expected a whole number"),
            ("rollup.enabled", "yes", "expected true or false"),
            (
                "auth.mode",
                "ldap",
                "expected one of \"rest\", \"static\", \"none\"",
            ),
            ("limits.max_sries", "1", "no such setting"),
            ("limits.max_body_bytes", "lots", "expected a size"),
            ("auth.cache_ttl", "soon", "`soon`"),
        ] {
            let err = load_text(None, &[given(path, raw)])
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("invalid {path}")), "{err}");
            assert!(err.contains(want) && err.contains("(from --set)"), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn an_empty_value_unsets_an_optional_setting() {
        let file = "[clickhouse]\nurl = \"http://ch:8123\"\n";
        let c = load_text(Some((file, "f")), &[given("clickhouse.url", "")]).unwrap();
        assert_eq!(c.clickhouse.url, None);
        let c = load_text(None, &[given("tenancy.labels", "")]).unwrap();
        assert!(c.tenancy.labels.is_empty(), "the empty list");
    }

    /// A setting that must have a value (not an `Option`) refuses an empty
    /// one from every source: `RWGATE_LOG_LEVEL=` would turn all logging
    /// off, an empty `spool.dir` is the working directory.
    #[test]
    fn an_empty_value_of_a_required_setting_is_refused() {
        let required: Vec<Setting> = all()
            .into_iter()
            .filter(|s| !s.optional && s.kind != Kind::List)
            .collect();
        assert!(required.len() > 50, "{required:?}");
        for s in &required {
            for raw in ["", "  "] {
                let err = load_text(None, &[given(&s.path, raw)])
                    .unwrap_err()
                    .to_string();
                assert_eq!(
                    err,
                    format!(
                        "invalid {} = {} (from --set): must not be empty",
                        s.path,
                        crate::display::shown(raw)
                    ),
                );
            }
            if matches!(
                s.kind,
                Kind::Text | Kind::Duration | Kind::Size | Kind::Choice(_)
            ) {
                let (section, key) = s.path.rsplit_once('.').unwrap_or(("", &s.path));
                let file = format!("[{section}]\n{key} = \"\"\n").replace("[]\n", "");
                let err = load_text(Some((&file, "f")), &[]).unwrap_err().to_string();
                assert_eq!(
                    err,
                    format!(
                        "invalid {} = \"\" (from config file f): must not be empty",
                        s.path
                    ),
                );
            }
        }
    }

    /// A value of the wrong type is told what its setting takes, in words
    /// read off the setting's kind, for every setting and from a file as
    /// from the command line: never a Rust type (`usize`, `enum Raw`), and
    /// the value shown once, as written.
    #[test]
    fn a_wrong_value_is_told_what_its_setting_takes() {
        for s in all() {
            // A wrong value in a file (TOML) and as text, for each kind.
            let (file_value, text) = match s.kind {
                Kind::Bool => ("\"maybe\"", Some("maybe".to_string())),
                Kind::Integer { max, .. } => ("\"many\"", Some(format!("{}", u128::from(max) + 1))),
                Kind::Float => ("\"half\"", Some("half".into())),
                Kind::Text => ("5", None),
                Kind::Duration => ("5", Some("soon".into())),
                Kind::Size => ("true", Some("-1".into())),
                Kind::List => ("5", Some("[1".into())),
                Kind::Choice(_) => ("2.0", Some("bogus".into())),
                Kind::Any => unreachable!("no setting is Any"),
            };
            let words = format!("expected {}", s.kind.expected());
            let (section, key) = s.path.rsplit_once('.').unwrap_or(("", &s.path));
            let file = format!("[{section}]\n{key} = {file_value}\n").replace("[]\n", "");
            let shown = file_value.trim_matches('"');
            let err = load_text(Some((&file, "f")), &[]).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "invalid {} = `{shown}` (from config file f): {words}",
                    s.path
                ),
            );
            if let Some(text) = text {
                let err = load_text(None, &[given(&s.path, &text)])
                    .unwrap_err()
                    .to_string();
                assert_eq!(
                    err,
                    format!("invalid {} = `{text}` (from --set): {words}", s.path),
                );
            }
        }
        // A section given a value.
        let err = load_text(Some(("[upstream]\ntls = 3\n", "f")), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid upstream.tls = `3` (from config file f): expected a section [upstream.tls]"
        );
        // The words of the kinds the probe found.
        for (path, words) in [
            (
                "limits.tenant_samples_per_sec",
                "a whole number from 0 to 4294967295",
            ),
            ("upstream.protocol", "\"1.0\" or \"2.0\""),
            ("auth.mode", "one of \"rest\", \"static\", \"none\""),
            (
                "limits.max_body_bytes",
                "a size such as 16MiB, or a number of bytes",
            ),
        ] {
            assert_eq!(find(path).unwrap().kind.expected(), words, "{path}");
        }
    }

    /// The value shown is the one of the setting at fault, also when one
    /// source (`--set`) gave several; a rule broken by a value a source gave
    /// names that source.
    #[test]
    fn errors_name_the_source_of_the_value_at_fault() {
        let err = load_text(
            None,
            &[
                given("limits.max_connections", "x"),
                given("listen", "127.0.0.1:1"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("invalid limits.max_connections = `x` (from --set)"),
            "{err}"
        );
        let rule = |file: Option<&str>, g: &[Given]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.toml");
            std::fs::write(&path, file.unwrap_or("")).unwrap();
            let file = file.map(|_| path.as_path());
            load(file, g, Config::validate).unwrap_err().to_string()
        };
        let mut env = given("limits.max_connections", "0");
        env.origin = "RWGATE_LIMITS_MAX_CONNECTIONS".into();
        assert_eq!(
            rule(None, &[given("auth.mode", "none"), env]),
            "invalid limits.max_connections (from RWGATE_LIMITS_MAX_CONNECTIONS): must be greater than 0"
        );
        let err = rule(
            Some("[auth]\nmode = \"none\"\n[clickhouse]\nraw_table = 'a-b'\n"),
            &[],
        );
        assert!(
            err.starts_with("invalid clickhouse.raw_table (from config file ")
                && err.ends_with(
                    "f.toml): `a-b` must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)"
                ),
            "{err}"
        );
        // A rule about a setting no source gave names no source.
        assert_eq!(
            rule(
                None,
                &[
                    given("limits.max_body_bytes", "1GiB"),
                    given("auth.mode", "none")
                ]
            ),
            "invalid limits.max_decoded_bytes: must be at least limits.max_body_bytes"
        );
    }

    /// Values are shown as written, without Rust's escaping.
    #[test]
    fn values_are_shown_as_written() {
        let err = |file: Option<&str>, g: &[Given]| {
            load_text(file.map(|f| (f, "f")), g)
                .unwrap_err()
                .to_string()
        };
        for (got, want) in [
            (
                err(None, &[given("limits.max_connections", "C:\\a\"b")]),
                "invalid limits.max_connections = `C:\\a\"b` (from --set): expected a whole number from 0 to 18446744073709551615",
            ),
            (
                err(Some("[auth]\nmode = 'a\\\"b'\n"), &[]),
                "invalid auth.mode = `a\\\"b` (from config file f): expected one of \"rest\", \"static\", \"none\"",
            ),
            // A size with a fraction says how to write it.
            (
                err(None, &[given("limits.max_decoded_bytes", "0.5GiB")]),
                "invalid limits.max_decoded_bytes = `0.5GiB` (from --set): a size is a whole number of its unit: write 512MiB, not 0.5GiB",
            ),
            // A value a custom check refuses is shown too.
            (
                err(None, &[given("listen", "nowhere")]),
                "invalid listen = `nowhere` (from --set): invalid socket address syntax",
            ),
        ] {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn later_sources_win() {
        let file = "[auth]\nmode = \"static\"\nrest_url = \"http://file\"\n";
        let c = load_text(
            Some((file, "f")),
            &[
                given("auth.rest_url", "http://env"),
                given("auth.rest_url", "http://set"),
            ],
        )
        .unwrap();
        assert_eq!(c.auth.mode, AuthMode::Static, "file over the defaults");
        assert_eq!(c.auth.rest_url.as_deref(), Some("http://set"));
    }

    #[test]
    fn file_errors_name_the_file_and_the_setting() {
        let err = from_toml("[limits]\nmax_bdy_bytes = 1\n", "/etc/rwgate.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid limits.max_bdy_bytes (from config file /etc/rwgate.toml): no such setting; limits has max_body_bytes, "),
            "{err}"
        );
        let err = from_toml("[limits]\nmax_body_bytes = \"lots\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid limits.max_body_bytes = `lots` (from config file x.toml): expected a size such as 16MiB, or a number of bytes"
        );
        let err = from_toml("[limits\n", "x.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config file x.toml: line 1, column "),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn names_of_an_earlier_release_are_refused() {
        let err = from_env(|n| (n == "RWGATE_REST_URL").then(|| "http://x".to_string()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "RWGATE_REST_URL is no longer read: set RWGATE_AUTH_REST_URL instead"
        );
        for (old, path) in RENAMED_ENV {
            assert!(find(path).is_some(), "{path}");
            assert_ne!(*old, env_name(path));
        }
        // Kubernetes' service variables are no settings and not read.
        let env = from_env(|n| (n == "RWGATE_SERVICE_HOST").then(|| "10.0.0.1".to_string()));
        assert_eq!(env.unwrap(), []);
    }
}
