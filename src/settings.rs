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

/// The type of a setting's value, as far as text input needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Integer,
    Float,
    /// Text, including durations, addresses and paths.
    Text,
    /// A list of text: `a,b` or a TOML array.
    List,
    /// One of these names.
    Choice(&'static [&'static str]),
    /// A number or text (sizes: `1048576` or `16MiB`).
    NumberOrText,
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

/// Reads and parses a config file, then applies `given` over it.
pub fn load(file: Option<&Path>, given: &[Given]) -> Result<Config, ConfigError> {
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
    load_text(
        file.as_ref()
            .map(|(text, origin)| (text.as_str(), origin.as_str())),
        given,
    )
}

/// A config file's text (`origin` names it in errors), without overrides.
pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
    load_text(Some((text, origin)), &[])
}

/// The tree from a config file's text (if any) and `given` over it, in order.
pub fn load_text(file: Option<(&str, &str)>, given: &[Given]) -> Result<Config, ConfigError> {
    let mut figment = Figment::new();
    if let Some((text, origin)) = file {
        let dict: Dict = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: toml_message(text, &e),
        })?;
        figment = figment.merge(Source {
            origin: format!("config file {origin}"),
            dict,
        });
    }
    let settings = all();
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
        figment = figment.merge(Source {
            origin: g.origin.clone(),
            dict,
        });
    }
    figment.extract().map_err(|e| {
        let setting = e.path.join(".");
        let origin = e
            .metadata
            .as_ref()
            .map_or_else(|| "defaults".to_string(), |m| m.name.to_string());
        ConfigError::Setting {
            value: None,
            message: kind_message(&e.kind, &setting),
            setting: if setting.is_empty() {
                "config".into()
            } else {
                setting
            },
            origin,
        }
    })
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

/// A figment error kind in words, without figment's own decorations.
fn kind_message(kind: &figment::error::Kind, setting: &str) -> String {
    use figment::error::Kind as K;
    let list = |names: &[&str]| names.join(", ");
    match kind {
        K::UnknownField(_, known) => {
            let section = setting.rsplit_once('.').map_or("the top level", |(s, _)| s);
            format!("no such setting; {section} has {}", list(known))
        }
        K::UnknownVariant(name, known) => {
            format!("{name:?} is not one of {}", list(known))
        }
        other => other.to_string(),
    }
}

/// `raw` as a value of `setting`'s type.
fn typed(setting: &Setting, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    if raw.is_empty() && setting.optional {
        return Ok(Value::from(Empty::None));
    }
    let integer = |raw: &str| -> Option<Value> {
        let digits = raw.replace('_', "");
        digits
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| digits.parse::<i64>().map(Value::from))
            .ok()
    };
    match setting.kind {
        // A quoted TOML string is that string (`"4ms"` is 4ms).
        Kind::Text => Ok(Value::from(quoted(raw).unwrap_or_else(|| raw.to_string()))),
        Kind::Bool => match raw {
            "true" => Ok(Value::from(true)),
            "false" => Ok(Value::from(false)),
            _ => Err("expected true or false".into()),
        },
        Kind::Integer => integer(raw).ok_or_else(|| "expected a whole number".into()),
        Kind::Float => raw
            .parse::<f64>()
            .map(Value::from)
            .map_err(|_| "expected a number".into()),
        Kind::Choice(names) => {
            if names.contains(&raw) {
                Ok(Value::from(raw.to_string()))
            } else {
                Err(format!("expected one of {}", names.join(", ")))
            }
        }
        Kind::NumberOrText => Ok(integer(raw).unwrap_or_else(|| Value::from(raw.to_string()))),
        Kind::List if raw.starts_with('[') => toml::from_str::<Dict>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .ok_or_else(|| "expected a list: a,b or [\"a\", \"b\"]".into()),
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
}

impl Provider for Source {
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
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    leaves! {
        deserialize_enum(_name: &'static str, variants: &'static [&'static str]) => Kind::Choice(variants),
        deserialize_unit_struct(_name: &'static str) => Kind::NumberOrText,
        deserialize_tuple(_len: usize) => Kind::List,
        deserialize_tuple_struct(_name: &'static str, _len: usize) => Kind::List,
        deserialize_bool => Kind::Bool,
        deserialize_i8 => Kind::Integer,
        deserialize_i16 => Kind::Integer,
        deserialize_i32 => Kind::Integer,
        deserialize_i64 => Kind::Integer,
        deserialize_i128 => Kind::Integer,
        deserialize_u8 => Kind::Integer,
        deserialize_u16 => Kind::Integer,
        deserialize_u32 => Kind::Integer,
        deserialize_u64 => Kind::Integer,
        deserialize_u128 => Kind::Integer,
        deserialize_f32 => Kind::Float,
        deserialize_f64 => Kind::Float,
        deserialize_char => Kind::Text,
        deserialize_str => Kind::Text,
        deserialize_string => Kind::Text,
        deserialize_bytes => Kind::Text,
        deserialize_byte_buf => Kind::Text,
        deserialize_identifier => Kind::Text,
        deserialize_seq => Kind::List,
        deserialize_map => Kind::NumberOrText,
        deserialize_unit => Kind::NumberOrText,
        deserialize_any => Kind::NumberOrText,
        deserialize_ignored_any => Kind::NumberOrText,
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
            ("limits.max_series_per_request", (Kind::Integer, false)),
            ("limits.max_body_bytes", (Kind::NumberOrText, false)),
            ("auth.cache_ttl", (Kind::Text, false)),
            ("tenancy.labels", (Kind::List, false)),
            ("rollup.enabled", (Kind::Bool, false)),
            (
                "auth.mode",
                (Kind::Choice(&["rest", "static", "none"]), false),
            ),
        ] {
            assert_eq!(kind(path), want, "{path}");
        }
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
            ("auth.mode", "ldap", "expected one of rest, static, none"),
            ("limits.max_sries", "1", "no such setting"),
            ("limits.max_body_bytes", "lots", "invalid size"),
            ("auth.cache_ttl", "soon", "soon"),
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
        let c = load_text(None, &[given("clickhouse.database", "")]).unwrap();
        assert_eq!(c.clickhouse.database, "", "not optional: the empty name");
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
        assert!(
            err.starts_with(
                "invalid limits.max_body_bytes (from config file x.toml): invalid size"
            ),
            "{err}"
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
