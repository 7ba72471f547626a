//! Loading: one TOML file, `TETHER__…` environment overrides merged over it
//! with the `config` crate, then deserialization section by section with
//! `serde_path_to_error`, so every bad key is reported with its key path and
//! one bad section does not hide the problems in the others.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::{Config, ConfigError, Problem, ENV_PREFIX};

impl Config {
    /// Loads `path`, applies `TETHER__…` overrides from `env`, and validates;
    /// a load error names the file.
    ///
    /// `env` is passed in (usually `std::env::vars()`) so tests never touch the
    /// process environment.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let named = |message: String| ConfigError::Load {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| named(e.to_string()))?;
        Self::from_toml_with_env(&text, env).map_err(|e| match e {
            ConfigError::Load { message, .. } => named(message),
            other => other,
        })
    }

    /// Parses TOML text without environment overrides, and validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, std::iter::empty())
    }

    /// Parses TOML text, applies `TETHER__…` overrides from `env`, and validates.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (config, mut problems, complete) = from_tree(merge(text, env)?);
        // Cross-key checks need every section; with one missing they would
        // report problems that are only echoes of the parse failure.
        if complete {
            if let Err(ConfigError::Invalid(more)) = config.validate() {
                // A bad key took its default, which the checks may find
                // wrong too (an unset route host): said once, as read.
                let echo = |p: &Problem| problems.iter().any(|seen| seen.key == p.key);
                let more: Vec<Problem> = more.into_iter().filter(|p| !echo(p)).collect();
                problems.extend(more);
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// A load error of text that did not come from a file.
fn load_error(message: impl ToString) -> ConfigError {
    ConfigError::Load {
        path: String::new(),
        message: message.to_string(),
    }
}

/// The TOML `text` with the overrides in `env` merged over it.
fn merge(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<toml::Value, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = env_key_to_path(rest);
        builder = builder
            .set_override(key.as_str(), env_value(&value))
            .map_err(|e| load_error(format!("environment variable {name}: {e}")))?;
    }
    let merged = builder.build().map_err(load_error)?;
    merged.try_deserialize().map_err(load_error)
}

/// Deserializes section by section so that one bad section does not hide
/// the problems in the others; `false` when a section could not be read at
/// all (it is left at its default).
fn from_tree(tree: toml::Value) -> (Config, Vec<Problem>, bool) {
    let mut config = Config::default();
    let toml::Value::Table(table) = tree else {
        let problem = Problem::new("(root)", "expected a table");
        return (config, vec![problem], false);
    };
    let mut sections = Sections {
        table,
        problems: Vec::new(),
        complete: true,
    };
    sections.table("log", &mut config.log);
    sections.table("admin", &mut config.admin);
    sections.table("runtime", &mut config.runtime);
    sections.array("listener", &mut config.listeners);
    sections.array("upstream", &mut config.upstreams);
    let Sections {
        table,
        mut problems,
        complete,
    } = sections;
    for unknown in table.keys() {
        problems.push(Problem::new(
            unknown.clone(),
            "unknown key (expected log, listener, upstream, admin or runtime)",
        ));
    }
    (config, problems, complete)
}

/// The file's top-level table, its sections taken out as they are read.
struct Sections {
    table: toml::Table,
    problems: Vec<Problem>,
    /// No section so far was beyond reading.
    complete: bool,
}

impl Sections {
    /// Reads the table `[name]`, when the file has one, into `target`.
    fn table<T: DeserializeOwned>(&mut self, name: &str, target: &mut T) {
        if let Some(value) = self.table.remove(name) {
            match section(value, name, &mut self.problems) {
                Some(parsed) => *target = parsed,
                None => self.complete = false,
            }
        }
    }

    /// Appends each `[[name]]` entry the file has to `target`.
    fn array<T: DeserializeOwned>(&mut self, name: &str, target: &mut Vec<T>) {
        match self.table.remove(name) {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let parsed = section(item, &format!("{name}[{i}]"), &mut self.problems);
                    self.complete &= parsed.is_some();
                    target.extend(parsed);
                }
            }
            Some(_) => {
                let message = format!("expected an array of tables: [[{name}]]");
                self.problems.push(Problem::new(name, message));
                self.complete = false;
            }
        }
    }
}

/// Deserializes one section, reporting every bad key in it: each failing key is
/// recorded and removed (so it takes its default) and the rest is tried again.
/// `None` when the section cannot stand even then (a required key is bad).
fn section<T: DeserializeOwned>(
    mut value: toml::Value,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    // Bounded: each round removes one key, and a section has a few dozen.
    for _ in 0..64 {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return Some(parsed),
            Err(e) => e,
        };
        let segments: Vec<String> = error
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        let inner = error.path().to_string();
        let full_key = if inner == "." || inner.is_empty() {
            key.to_owned()
        } else {
            format!("{key}.{inner}")
        };
        // The TOML deserializer appends the key and a blank line; the path says it.
        let message = error
            .into_inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let already_reported = problems.iter().any(|p| p.key == full_key);
        if !already_reported {
            problems.push(Problem::new(full_key, message));
        }
        if already_reported || segments.is_empty() || !remove_path(&mut value, &segments) {
            return None;
        }
    }
    None
}

fn remove_path(value: &mut toml::Value, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for segment in parents {
        node = match node {
            toml::Value::Table(t) => match t.get_mut(segment) {
                Some(next) => next,
                None => return false,
            },
            toml::Value::Array(items) => {
                match segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match node {
        toml::Value::Table(t) => t.remove(last).is_some(),
        toml::Value::Array(items) => match last.parse::<usize>() {
            Ok(i) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// `LISTENER__0__IDLE_TIMEOUT` → `listener[0].idle_timeout`.
fn env_key_to_path(rest: &str) -> String {
    let mut path = String::new();
    for part in rest.split("__") {
        let part = part.to_ascii_lowercase();
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() && !path.is_empty() {
            path.push('[');
            path.push_str(&part);
            path.push(']');
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&part);
        }
    }
    path
}

/// An override value is read as a TOML value when it is one (`10`, `true`,
/// `["a:1", "b:2"]`) and as a plain string otherwise (`30s`, `debug`).
fn env_value(text: &str) -> config::Value {
    let parsed = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v) => toml_to_config(v),
        None => config::Value::from(text),
    }
}

fn toml_to_config(value: toml::Value) -> config::Value {
    match value {
        toml::Value::String(s) => s.into(),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => f.into(),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(items) => items
            .into_iter()
            .map(toml_to_config)
            .collect::<Vec<_>>()
            .into(),
        toml::Value::Table(table) => table
            .into_iter()
            .map(|(k, v)| (k, toml_to_config(v)))
            .collect::<std::collections::HashMap<_, _>>()
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{ClientClose, Config, MINIMAL};

    #[test]
    fn environment_overrides_nested_and_indexed_keys() {
        let env = [
            ("TETHER__RUNTIME__DRAIN_TIMEOUT", "5s"),
            ("TETHER__LISTENER__0__CLIENT_CLOSE", "abort"),
            ("TETHER__LISTENER__0__MAX_REQUESTS_PER_CONNECTION", "1"),
            ("TETHER__UPSTREAM__0__POOL__MIN_IDLE", "4"),
            (
                "TETHER__UPSTREAM__0__ENDPOINTS",
                r#"["127.0.0.1:1", "127.0.0.1:2"]"#,
            ),
            ("OTHER", "ignored"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let c = Config::from_toml_with_env(MINIMAL, env).unwrap();
        assert_eq!(c.runtime.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.listeners[0].client_close, ClientClose::Abort);
        assert_eq!(c.listeners[0].max_requests_per_connection, 1);
        assert_eq!(c.upstreams[0].pool.min_idle, 4);
        assert_eq!(c.upstreams[0].endpoints.len(), 2);
    }
}
