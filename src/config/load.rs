//! Loading: one TOML file, `TETHER__…` environment overrides merged over it
//! with the `config` crate, then deserialization section by section with
//! `serde_path_to_error`, so every bad key is reported with its key path and
//! one bad section does not hide the problems in the others.

use std::path::Path;

use super::{Config, ConfigError, Problem, ENV_PREFIX};

/// Reads `path`, applies the overrides in `env`, and validates; a load error
/// names the file.
pub(super) fn from_file(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let load_error = |message: String| ConfigError::Load {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load_error(e.to_string()))?;
    from_text(&text, env).map_err(|e| match e {
        ConfigError::Load { message, .. } => load_error(message),
        other => other,
    })
}

/// Parses TOML `text`, applies the overrides in `env`, and validates.
pub(super) fn from_text(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = env_key_to_path(rest);
        builder = builder
            .set_override(key.as_str(), env_value(&value))
            .map_err(|e| ConfigError::Load {
                path: String::new(),
                message: format!("environment variable {name}: {e}"),
            })?;
    }
    let merged = builder.build().map_err(|e| ConfigError::Load {
        path: String::new(),
        message: e.to_string(),
    })?;
    let tree: toml::Value = merged.try_deserialize().map_err(|e| ConfigError::Load {
        path: String::new(),
        message: e.to_string(),
    })?;
    let (config, mut problems, complete) = from_tree(tree);
    // Cross-key checks need every section; with one missing they would
    // report problems that are only echoes of the parse failure.
    if complete {
        if let Err(ConfigError::Invalid(more)) = config.validate() {
            problems.extend(more);
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Deserializes section by section so that one bad section does not hide
/// the problems in the others.
fn from_tree(tree: toml::Value) -> (Config, Vec<Problem>, bool) {
    let mut problems = Vec::new();
    let mut config = Config::default();
    let mut complete = true;
    let toml::Value::Table(mut table) = tree else {
        let problem = Problem {
            key: "(root)".into(),
            message: "expected a table".into(),
        };
        return (config, vec![problem], false);
    };
    if let Some(v) = table.remove("log") {
        match section(v, "log", &mut problems) {
            Some(log) => config.log = log,
            None => complete = false,
        }
    }
    if let Some(v) = table.remove("admin") {
        match section(v, "admin", &mut problems) {
            Some(admin) => config.admin = admin,
            None => complete = false,
        }
    }
    if let Some(v) = table.remove("runtime") {
        match section(v, "runtime", &mut problems) {
            Some(runtime) => config.runtime = runtime,
            None => complete = false,
        }
    }
    for (name, target) in [("listener", true), ("upstream", false)] {
        let Some(value) = table.remove(name) else {
            continue;
        };
        let toml::Value::Array(items) = value else {
            problems.push(Problem {
                key: name.into(),
                message: format!("expected an array of tables: [[{name}]]"),
            });
            complete = false;
            continue;
        };
        for (i, item) in items.into_iter().enumerate() {
            let key = format!("{name}[{i}]");
            let parsed = if target {
                section(item, &key, &mut problems).map(|l| config.listeners.push(l))
            } else {
                section(item, &key, &mut problems).map(|u| config.upstreams.push(u))
            };
            complete &= parsed.is_some();
        }
    }
    for unknown in table.keys() {
        problems.push(Problem {
            key: unknown.clone(),
            message: "unknown key (expected log, listener, upstream, admin or runtime)".into(),
        });
    }
    (config, problems, complete)
}

/// Deserializes one section, reporting every bad key in it: each failing key is
/// recorded and removed (so it takes its default) and the rest is tried again.
/// `None` when the section cannot stand even then (a required key is bad).
fn section<T: serde::de::DeserializeOwned>(
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
            problems.push(Problem {
                key: full_key,
                message,
            });
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
