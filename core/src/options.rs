//! One typed reader for the string options of a [`TransportSpec`] or [`StorageSpec`].
//!
//! Options arrive as written in a configuration file: a map of strings. Every backend and
//! transport reads them the same way through [`Options`]: typed getters that return `None`
//! for an absent key and an [`OptionsError`] naming the key for a value that does not parse;
//! each getter records the key it was asked for, and [`Options::finish`] then refuses any key
//! that no getter asked for, listing the known ones (a misspelt option fails loudly instead of
//! being ignored). Values are trimmed before they are parsed, except by [`Options::string`]
//! and [`Options::path`], which return them as written.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::num::NonZeroUsize;
//! use chorus_core::options::Options;
//!
//! let map = BTreeMap::from([("queue_capacity".to_owned(), "64".to_owned())]);
//! let mut options = Options::new("the example transport", &map);
//! let capacity: Option<NonZeroUsize> = options.parse("queue_capacity")?;
//! let wait = options.millis("queue_wait_ms")?;
//! options.finish()?;
//! assert_eq!((capacity.map(NonZeroUsize::get), wait), (Some(64), None));
//! # Ok::<_, chorus_core::options::OptionsError>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[cfg(doc)]
use crate::storage::StorageError;
#[cfg(doc)]
use crate::transport::TransportError;

#[cfg(doc)]
use crate::registry::{StorageSpec, TransportSpec};

/// Why options were refused. Converts into [`TransportError::Config`] and
/// [`StorageError::Config`], whose message is this error's text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// A value does not parse as what the option takes.
    #[error("option `{key}` = {value:?} of {owner}: {source}")]
    Invalid {
        /// Whose option it is (`the tcp transport`, say).
        owner: String,
        /// The option.
        key: String,
        /// Its value, as written.
        value: String,
        /// Why it does not parse.
        source: Box<dyn Error + Send + Sync>,
    },
    /// A required option is absent.
    #[error("option `{key}` of {owner} is required: {what}")]
    Missing {
        /// Whose option it is.
        owner: String,
        /// The option.
        key: String,
        /// What it should hold.
        what: String,
    },
    /// Options that no getter asked for: misspelt, or meant for another component.
    #[error("{}", unknown_message(.owner, .keys, .known))]
    Unknown {
        /// Whose options they are.
        owner: String,
        /// The unknown keys, sorted.
        keys: Vec<String>,
        /// The keys that were asked for, sorted.
        known: Vec<String>,
    },
}

fn unknown_message(owner: &str, keys: &[String], known: &[String]) -> String {
    let quoted = |keys: &[String]| {
        keys.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let plural = if keys.len() == 1 { "" } else { "s" };
    if known.is_empty() {
        return format!(
            "unknown option{plural} {} for {owner} (it takes none)",
            quoted(keys)
        );
    }
    format!(
        "unknown option{plural} {} for {owner} (known: {})",
        quoted(keys),
        quoted(known)
    )
}

/// A unit a duration option may be written in (see [`parse_duration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DurationUnit {
    /// `us`.
    Micros,
    /// `ms`.
    Millis,
    /// `s`.
    Secs,
}

impl DurationUnit {
    /// The suffix that names the unit.
    pub fn suffix(self) -> &'static str {
        match self {
            DurationUnit::Micros => "us",
            DurationUnit::Millis => "ms",
            DurationUnit::Secs => "s",
        }
    }

    fn of(self, n: u64) -> Duration {
        match self {
            DurationUnit::Micros => Duration::from_micros(n),
            DurationUnit::Millis => Duration::from_millis(n),
            DurationUnit::Secs => Duration::from_secs(n),
        }
    }
}

/// A duration written as decimal digits followed by one of `units` (`50ms`, `2s`), surrounding
/// whitespace ignored; `None` for anything else.
pub fn parse_duration(text: &str, units: &[DurationUnit]) -> Option<Duration> {
    let text = text.trim();
    let (number, suffix) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let unit = units.iter().find(|u| u.suffix() == suffix)?;
    Some(unit.of(n))
}

/// The form [`parse_duration`] accepts with `units`, for error messages: `<n><ms|s>`.
pub fn duration_syntax(units: &[DurationUnit]) -> String {
    let suffixes: Vec<&str> = units.iter().map(|u| u.suffix()).collect();
    format!("<n><{}>", suffixes.join("|"))
}

/// When a durable backend makes writes durable: the `never | always | interval:<d>` grammar
/// the file backend's `fsync` and sled's `flush` options share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncPolicy {
    /// Only when asked (flush, close, and whatever the backend does on its own).
    Never,
    /// At most this long after a write; never zero.
    Interval(Duration),
    /// Before acknowledging each write.
    Always,
}

impl SyncPolicy {
    /// Parses `never`, `always` or `interval:<n><unit>` with one of `units` and `n > 0`.
    pub fn parse(text: &str, units: &[DurationUnit]) -> Result<SyncPolicy, String> {
        match text.trim() {
            "never" => Ok(SyncPolicy::Never),
            "always" => Ok(SyncPolicy::Always),
            other => other
                .strip_prefix("interval:")
                .and_then(|d| parse_duration(d, units))
                .filter(|d| !d.is_zero())
                .map(SyncPolicy::Interval)
                .ok_or_else(|| {
                    format!(
                        "{other:?} is not \"never\", \"always\" or \"interval:{}\" with n > 0",
                        duration_syntax(units)
                    )
                }),
        }
    }
}

/// Typed access to one component's options. See the [module documentation](self).
#[derive(Debug)]
pub struct Options<'a> {
    owner: String,
    map: &'a BTreeMap<String, String>,
    asked: BTreeSet<String>,
}

impl<'a> Options<'a> {
    /// A reader of `map`, the options of `owner` (named in errors: `the tcp transport`).
    pub fn new(owner: impl Into<String>, map: &'a BTreeMap<String, String>) -> Self {
        Options {
            owner: owner.into(),
            map,
            asked: BTreeSet::new(),
        }
    }

    /// The value as written, or `None`.
    pub fn string(&mut self, key: &str) -> Option<&'a str> {
        self.asked.insert(key.to_owned());
        self.map.get(key).map(String::as_str)
    }

    /// The value as a path, as written.
    pub fn path(&mut self, key: &str) -> Option<PathBuf> {
        self.string(key).map(PathBuf::from)
    }

    /// A comma-separated list: each item trimmed, empty items dropped.
    pub fn list(&mut self, key: &str) -> Option<Vec<&'a str>> {
        self.string(key).map(|value| {
            value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .collect()
        })
    }

    /// The value parsed with [`FromStr`]: integers (`u64`, `usize`, `NonZeroUsize`, ...; sizes
    /// are plain byte counts), `bool` (`true` or `false`), or a component's own type.
    pub fn parse<T>(&mut self, key: &str) -> Result<Option<T>, OptionsError>
    where
        T: FromStr,
        T::Err: Into<Box<dyn Error + Send + Sync>>,
    {
        self.with(key, |text| text.parse::<T>().map_err(Into::into))
    }

    /// A whole number of milliseconds (the `_ms` options).
    pub fn millis(&mut self, key: &str) -> Result<Option<Duration>, OptionsError> {
        Ok(self.parse::<u64>(key)?.map(Duration::from_millis))
    }

    /// A duration with a unit, one of `units` (see [`parse_duration`]).
    pub fn duration(
        &mut self,
        key: &str,
        units: &[DurationUnit],
    ) -> Result<Option<Duration>, OptionsError> {
        self.with(key, |text| {
            parse_duration(text, units)
                .ok_or_else(|| format!("not {}", duration_syntax(units)).into())
        })
    }

    /// One of the names in `choices`, as the value paired with it.
    pub fn choice<T: Clone>(
        &mut self,
        key: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, OptionsError> {
        self.with(key, |text| {
            choices
                .iter()
                .find(|(name, _)| *name == text)
                .map(|(_, value)| value.clone())
                .ok_or_else(|| {
                    let names: Vec<String> = choices
                        .iter()
                        .map(|(name, _)| format!("{name:?}"))
                        .collect();
                    format!("not one of {}", names.join(", ")).into()
                })
        })
    }

    /// The trimmed value through `parse`; its error is reported with the key and value.
    fn with<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, Box<dyn Error + Send + Sync>>,
    ) -> Result<Option<T>, OptionsError> {
        let Some(value) = self.string(key) else {
            return Ok(None);
        };
        parse(value.trim())
            .map(Some)
            .map_err(|source| OptionsError::Invalid {
                owner: self.owner.clone(),
                key: key.to_owned(),
                value: value.to_owned(),
                source,
            })
    }

    /// The error for a required option that is absent; `what` says what it should hold.
    pub fn missing(&self, key: &str, what: &str) -> OptionsError {
        OptionsError::Missing {
            owner: self.owner.clone(),
            key: key.to_owned(),
            what: what.to_owned(),
        }
    }

    /// Refuses every key that no getter asked for. Call it after the last getter.
    pub fn finish(&self) -> Result<(), OptionsError> {
        let keys: Vec<String> = self
            .map
            .keys()
            .filter(|key| !self.asked.contains(*key))
            .cloned()
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        Err(OptionsError::Unknown {
            owner: self.owner.clone(),
            keys,
            known: self.asked.iter().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};

    use super::*;
    use DurationUnit::{Micros, Millis, Secs};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[derive(Clone, Debug, PartialEq)]
    enum Preset {
        Lan,
        Local,
    }

    #[test]
    fn every_getter_reads_its_type_and_absent_keys_are_none() {
        let map = map(&[
            ("n", " 42 "),
            ("nz", "7"),
            ("flag", "false"),
            ("wait_ms", "250"),
            ("every", "50us"),
            ("preset", "local"),
            ("name", " as written "),
            ("dir", "/var/lib/chorus"),
            ("peers", "a.pem, ,b.pem,"),
        ]);
        let mut o = Options::new("the test", &map);
        assert_eq!(o.parse::<u64>("n").unwrap(), Some(42));
        assert_eq!(o.parse::<usize>("n").unwrap(), Some(42));
        assert_eq!(o.parse::<NonZeroU32>("nz").unwrap(), NonZeroU32::new(7));
        assert_eq!(o.parse::<bool>("flag").unwrap(), Some(false));
        assert_eq!(
            o.millis("wait_ms").unwrap(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            o.duration("every", &[Micros, Millis]).unwrap(),
            Some(Duration::from_micros(50))
        );
        let presets = [("lan", Preset::Lan), ("local", Preset::Local)];
        assert_eq!(o.choice("preset", &presets).unwrap(), Some(Preset::Local));
        assert_eq!(o.string("name"), Some(" as written "));
        assert_eq!(o.path("dir"), Some(PathBuf::from("/var/lib/chorus")));
        assert_eq!(o.list("peers"), Some(vec!["a.pem", "b.pem"]));
        // Absent keys are `None`, and asking for them makes them known.
        assert_eq!(o.parse::<u64>("absent").unwrap(), None);
        assert_eq!(o.millis("absent_ms").unwrap(), None);
        assert_eq!(o.choice("absent_preset", &presets).unwrap(), None);
        o.finish().expect("every key was read");
    }

    #[test]
    fn a_bad_value_names_its_key_value_and_reason_and_keeps_the_source() {
        let map = map(&[
            ("queue_capacity", "0"),
            ("wait_ms", "soon"),
            ("every", "5m"),
            ("preset", "moon"),
            ("flag", "yes"),
        ]);
        let mut o = Options::new("the test transport", &map);
        let err = o.parse::<NonZeroUsize>("queue_capacity").unwrap_err();
        assert!(matches!(&err, OptionsError::Invalid { key, .. } if key == "queue_capacity"));
        let text = err.to_string();
        assert!(
            text.starts_with("option `queue_capacity` = \"0\" of the test transport: "),
            "{text}"
        );
        assert!(err.source().is_some(), "the parse error is kept");
        let text = o.millis("wait_ms").unwrap_err().to_string();
        assert!(
            text.contains("`wait_ms`") && text.contains("invalid digit"),
            "{text}"
        );
        let text = o
            .duration("every", &[Millis, Secs])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("`every`") && text.contains("<n><ms|s>"),
            "{text}"
        );
        let presets = [("lan", Preset::Lan), ("local", Preset::Local)];
        let text = o.choice("preset", &presets).unwrap_err().to_string();
        assert!(text.contains("not one of \"lan\", \"local\""), "{text}");
        assert!(o.parse::<bool>("flag").is_err());
    }

    #[test]
    fn keys_no_getter_asked_for_are_refused_with_the_known_ones() {
        let map = map(&[("colour", "blue"), ("size", "1"), ("zest", "x")]);
        let mut o = Options::new("the test backend", &map);
        assert_eq!(o.parse::<u64>("size").unwrap(), Some(1));
        let _ = o.parse::<u64>("other").unwrap();
        let err = o.finish().unwrap_err();
        match &err {
            OptionsError::Unknown { keys, known, .. } => {
                assert_eq!(keys, &["colour", "zest"]);
                assert_eq!(known, &["other", "size"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "unknown options `colour`, `zest` for the test backend (known: `other`, `size`)"
        );
    }

    #[test]
    fn a_missing_required_option_says_what_it_holds() {
        let map = map(&[]);
        let o = Options::new("the test transport", &map);
        let err = o.missing("cert", "a PEM file");
        assert_eq!(
            err.to_string(),
            "option `cert` of the test transport is required: a PEM file"
        );
    }

    #[test]
    fn sync_policies_share_one_grammar() {
        let units = [Millis, Secs];
        assert_eq!(SyncPolicy::parse(" never", &units), Ok(SyncPolicy::Never));
        assert_eq!(SyncPolicy::parse("always ", &units), Ok(SyncPolicy::Always));
        assert_eq!(
            SyncPolicy::parse("interval:50ms", &units),
            Ok(SyncPolicy::Interval(Duration::from_millis(50)))
        );
        for bad in [
            "interval:0ms",
            "interval:5us",
            "interval:",
            "sometimes",
            "interval:-1s",
        ] {
            let err = SyncPolicy::parse(bad, &units).expect_err(bad);
            assert!(err.contains("interval:<n><ms|s>"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_take_only_the_allowed_units() {
        let all = [Micros, Millis, Secs];
        assert_eq!(parse_duration(" 2s ", &all), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_duration("250us", &all),
            Some(Duration::from_micros(250))
        );
        assert_eq!(parse_duration("250us", &[Millis, Secs]), None);
        for bad in ["", "ms", "5", "5m", "-5ms", "+5ms", "5 ms", "1.5s"] {
            assert_eq!(parse_duration(bad, &all), None, "{bad:?}");
        }
        assert_eq!(duration_syntax(&all), "<n><us|ms|s>");
    }
}
