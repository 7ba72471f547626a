//! Every tether configuration shipped under deploy/ is one `tether check`
//! accepts, wherever it lives: a `*.toml` file, a `*.toml` key of a ConfigMap
//! in any YAML file, or a `*.toml` config written inline in a compose file.
//! And the compose example wires the app to tether the way the guide says.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{files_under, repo, tether_command, yaml_documents};
use serde_norway::Value;
use tether::config::Config;

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e))
}

/// Where a config was found.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    TomlFile,
    ConfigMap,
    ComposeInline,
}

/// A tether config found under deploy/: where it is, and its text.
struct Found {
    source: Source,
    origin: String,
    text: String,
}

fn is_compose(doc: &Value) -> bool {
    doc["services"].is_mapping()
}

/// Inline compose configs that are tether configs: named `*.toml`, or
/// mounted by some service at a `*.toml` target.
fn compose_inline_configs(doc: &Value) -> Vec<(String, String)> {
    let mounted_as_toml = |name: &str| {
        doc["services"]
            .as_mapping()
            .into_iter()
            .flatten()
            .flat_map(|(_, service)| service["configs"].as_sequence().into_iter().flatten())
            .any(|c| {
                c["source"].as_str() == Some(name)
                    && c["target"].as_str().is_some_and(|t| t.ends_with(".toml"))
            })
    };
    doc["configs"]
        .as_mapping()
        .into_iter()
        .flatten()
        .filter_map(|(name, config)| {
            let name = name.as_str()?;
            let content = config["content"].as_str()?;
            (name.ends_with(".toml") || mounted_as_toml(name))
                .then(|| (name.to_owned(), content.to_owned()))
        })
        .collect()
}

fn embedded_configs() -> Vec<Found> {
    let deploy = repo().join("deploy");
    let mut found = Vec::new();
    for path in files_under(&deploy) {
        let rel = path.strip_prefix(repo()).unwrap().display().to_string();
        if has_ext(&path, &["toml"]) {
            found.push(Found {
                source: Source::TomlFile,
                origin: rel,
                text: std::fs::read_to_string(&path).unwrap(),
            });
        } else if has_ext(&path, &["yaml", "yml"]) {
            for doc in yaml_documents(&path) {
                if doc["kind"].as_str() == Some("ConfigMap") {
                    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
                    for (key, value) in doc["data"].as_mapping().into_iter().flatten() {
                        let key = key.as_str().unwrap_or_default();
                        if key.ends_with(".toml") {
                            found.push(Found {
                                source: Source::ConfigMap,
                                origin: format!("{rel}: ConfigMap {name} data.{key}"),
                                text: value.as_str().expect("ConfigMap data is text").to_owned(),
                            });
                        }
                    }
                } else if is_compose(&doc) {
                    for (name, content) in compose_inline_configs(&doc) {
                        found.push(Found {
                            source: Source::ComposeInline,
                            origin: format!("{rel}: configs.{name}"),
                            text: content,
                        });
                    }
                }
            }
        }
    }
    found
}

fn tether_check(file: &Path) -> std::process::Output {
    let mut command = tether_command();
    command.arg("check").arg("--config").arg(file);
    // The shipped text alone, whatever this shell exports.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TETHER__") {
            command.env_remove(name);
        }
    }
    command.output().unwrap()
}

#[test]
fn tether_check_accepts_every_config_under_deploy() {
    let found = embedded_configs();
    let origins: Vec<&str> = found.iter().map(|f| f.origin.as_str()).collect();
    // At least the Kubernetes ConfigMap's and the compose example's: a broken
    // extractor must not pass by finding nothing.
    assert!(found.len() >= 2, "found only {origins:?}");
    assert!(
        found.iter().any(|f| f.source == Source::ConfigMap),
        "no ConfigMap config found: {origins:?}"
    );
    assert!(
        origins.contains(&"deploy/compose/tether.toml"),
        "the compose example's config is missing: {origins:?}"
    );

    let dir = std::env::temp_dir().join(format!("tether-deploy-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    for (i, f) in found.iter().enumerate() {
        let file = dir.join(format!("{i}.toml"));
        std::fs::write(&file, &f.text).unwrap();
        let out = tether_check(&file);
        if !out.status.success() {
            failures.push(format!(
                "{} ({}): exit {}\n{}",
                f.origin,
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    if failures.is_empty() {
        std::fs::remove_dir_all(&dir).ok();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("tether check accepted {} configs: {origins:?}", found.len());
}

#[test]
fn inline_compose_configs_count_when_named_or_mounted_as_toml() {
    let doc: Value = serde_norway::from_str(
        r#"
services:
  tether:
    configs:
      - source: main
        target: /etc/tether/tether.toml
configs:
  main:
    content: "a"
  extra.toml:
    content: "b"
  nginx.conf:
    content: "c"
  from_file.toml:
    file: ./x.toml
"#,
    )
    .unwrap();
    let mut names: Vec<String> = compose_inline_configs(&doc)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    names.sort();
    assert_eq!(names, ["extra.toml", "main"]);
}

/// A compose duration: "30s", "1m30s", "1m 30s".
fn compose_duration(value: &Value) -> Duration {
    let text = value.as_str().expect("a duration string");
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

#[test]
fn compose_app_shares_tethers_network_and_starts_once_tether_is_healthy() {
    let dir = repo().join("deploy/compose");
    let docs = yaml_documents(&dir.join("docker-compose.yml"));
    assert_eq!(docs.len(), 1);
    let services = &docs[0]["services"];
    let (tether, app, backend) = (&services["tether"], &services["app"], &services["backend"]);

    assert_eq!(tether["image"].as_str(), Some("tether:0.1.0"));
    let context = tether["build"]["context"].as_str().expect("build.context");
    assert_eq!(
        dir.join(context).canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "tether is built from the repository's root"
    );
    let test: Vec<&str> = tether["healthcheck"]["test"]
        .as_sequence()
        .expect("healthcheck.test as a list")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        test.get(..4),
        Some(&["CMD", "/usr/local/bin/tether", "health", "--ready"][..]),
        "healthy means ready: {test:?}"
    );

    // The config: bind-mounted read-only at /etc/tether/tether.toml.
    let mounts: Vec<&Value> = tether["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|v| v["target"].as_str() == Some("/etc/tether/tether.toml"))
        .collect();
    assert_eq!(
        mounts.len(),
        1,
        "mount the config at /etc/tether/tether.toml"
    );
    assert_eq!(mounts[0]["read_only"].as_bool(), Some(true));
    let source = dir.join(mounts[0]["source"].as_str().expect("volume source"));
    let text =
        std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let config = Config::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", source.display()));

    let grace = compose_duration(&tether["stop_grace_period"]);
    assert!(
        grace > config.runtime.drain_timeout,
        "stop_grace_period {grace:?} must exceed drain_timeout {:?}",
        config.runtime.drain_timeout
    );
    for (name, service) in [("tether", tether), ("app", app)] {
        assert_eq!(service["read_only"].as_bool(), Some(true), "{name}");
        assert_eq!(
            service["cap_drop"].as_sequence().map(|c| c.as_slice()),
            Some(&[Value::from("ALL")][..]),
            "{name}"
        );
        assert!(
            service["security_opt"]
                .as_sequence()
                .into_iter()
                .flatten()
                .any(|o| matches!(
                    o.as_str(),
                    Some("no-new-privileges:true" | "no-new-privileges")
                )),
            "{name}: no-new-privileges"
        );
    }

    assert_eq!(app["network_mode"].as_str(), Some("service:tether"));
    assert_eq!(
        app["depends_on"]["tether"]["condition"].as_str(),
        Some("service_healthy"),
        "the app starts once tether is ready"
    );
    let listen = config.listeners[0].listen.to_string();
    assert_eq!(listen, "127.0.0.1:8080");
    assert_eq!(
        app["environment"]["BACKEND_URL"].as_str(),
        Some(format!("http://{listen}").as_str()),
        "the app is pointed at tether"
    );
    assert!(
        config.admin.listen.ip().is_loopback(),
        "/config stays on loopback"
    );

    let image = backend["image"].as_str().expect("backend image");
    let (repository, tag) = image.split_once(':').expect("a pinned backend image");
    assert_eq!(repository, "nginx");
    assert!(tag != "latest" && !tag.is_empty(), "pin nginx: {image}");
    assert_eq!(config.upstreams[0].endpoints, ["backend:80"]);
}
