//! The shipped configuration files and the README's reference stay true to the
//! config structs: every file loads, `tether check` accepts it, the reference
//! file states every key at its default, and the README documents every key.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{repo, run_ok, tether_command, TempDir};
use tether::config::{Config, ListenerConfig, UpstreamConfig};

/// `tether check --config FILE`, to be run.
fn tether_check(file: &Path) -> Command {
    let mut command = tether_command();
    command.args(["check", "--config"]).arg(file);
    command
}

fn config_files() -> Vec<PathBuf> {
    let dir = repo().join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 2,
        "ship a reference file and at least one example"
    );
    files
}

fn key_paths(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                key_paths(v, &path, out);
            }
        }
        toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
            for item in items {
                key_paths(item, prefix, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[test]
fn every_shipped_config_file_loads() {
    for file in config_files() {
        Config::load(&file, std::iter::empty())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn tether_check_accepts_every_shipped_file_and_prints_a_loadable_config() {
    for file in config_files() {
        let out = run_ok(&mut tether_check(&file), "");
        let printed = String::from_utf8(out.stdout).unwrap();
        let reparsed = Config::from_toml(&printed).unwrap();
        assert_eq!(reparsed, Config::load(&file, std::iter::empty()).unwrap());
    }
}

#[test]
fn tether_check_rejects_a_broken_file_with_key_paths_and_exit_64() {
    let dir = TempDir::new("tether-check");
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        r#"
        [[listener]]
        name = "app"
        listen = "127.0.0.1:8080"
        upstream = "nowhere"
        idle_timeout = "forever"
        clinet_close = "abort"

        [[upstream]]
        name = "backend"
        endpoints = ["no-port"]
        "#,
    )
    .unwrap();
    let out = tether_check(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener[0]"), "{stderr}");
    assert!(
        stderr.contains("clinet_close") || stderr.contains("idle_timeout"),
        "{stderr}"
    );
    assert!(stderr.contains("upstream[0].endpoints[0]"), "{stderr}");

    let out = tether_check(&file)
        .env("TETHER__LISTENER__0__UPSTREAM", "backend")
        .env("TETHER__LISTENER__0__IDLE_TIMEOUT", "5s")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "still broken: unknown key and bad endpoint"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("listener[0].upstream"),
        "environment fixed it: {stderr}"
    );
}

#[test]
fn reference_file_states_every_key_at_its_default() {
    let path = repo().join("config/tether.toml");
    let config = Config::load(&path, std::iter::empty()).unwrap();
    let l = &config.listeners[0];
    assert_eq!(
        l,
        &ListenerConfig::new(&l.name, l.listen.clone(), &l.upstream)
    );
    let u = &config.upstreams[0];
    assert_eq!(u, &UpstreamConfig::new(&u.name, u.endpoints.clone()));
    assert_eq!(config.log, Default::default());
    assert_eq!(config.runtime, Default::default());
    assert_eq!(config.admin, Default::default());

    let text = std::fs::read_to_string(&path).unwrap();
    let mut in_file = BTreeSet::new();
    key_paths(&text.parse::<toml::Value>().unwrap(), "", &mut in_file);
    let mut effective = BTreeSet::new();
    key_paths(
        &config.to_toml().parse::<toml::Value>().unwrap(),
        "",
        &mut effective,
    );
    assert_eq!(in_file, effective, "config/tether.toml must list every key");
}

#[test]
fn readme_reference_documents_every_key() {
    let path = repo().join("config/tether.toml");
    let config = Config::load(&path, std::iter::empty()).unwrap();
    let mut keys = BTreeSet::new();
    key_paths(
        &config.to_toml().parse::<toml::Value>().unwrap(),
        "",
        &mut keys,
    );
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for key in keys {
        let leaf = key.rsplit('.').next().unwrap();
        let section = key.rsplit_once('.').map_or("", |(s, _)| s);
        let row = format!("| `{leaf}` |");
        let found = readme.split("\n### ").any(|part| {
            part.starts_with(&format!("`[{section}]`"))
                || part.starts_with(&format!("`[[{section}]]`"))
        }) && readme
            .split("\n### ")
            .filter(|part| {
                part.starts_with(&format!("`[{section}]`"))
                    || part.starts_with(&format!("`[[{section}]]`"))
            })
            .any(|part| part.contains(&row));
        assert!(found, "README's config reference lacks {key}");
    }
}

#[test]
fn readme_reference_documents_every_key_the_example_files_use() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let sections: Vec<&str> = readme.split("\n### ").collect();
    for file in config_files() {
        let config = Config::load(&file, std::iter::empty()).unwrap();
        let mut keys = BTreeSet::new();
        key_paths(
            &config.to_toml().parse::<toml::Value>().unwrap(),
            "",
            &mut keys,
        );
        for key in keys {
            let (section, leaf) = key.rsplit_once('.').unwrap_or(("", &key));
            let row = format!("| `{leaf}` |");
            let documented = sections.iter().any(|part| {
                (part.starts_with(&format!("`[{section}]`"))
                    || part.starts_with(&format!("`[[{section}]]`")))
                    && part.contains(&row)
            });
            assert!(
                documented,
                "{}: README's config reference lacks {key}",
                file.display()
            );
        }
    }
}

/// `[upstream.tls]` is commented out in the reference file (its presence
/// turns TLS on): uncommented, it states every key at its default but the
/// examples of keys that have none, and the README documents every key.
#[test]
fn the_reference_tls_section_and_the_readme_cover_every_tls_key() {
    let text = std::fs::read_to_string(repo().join("config/tether.toml")).unwrap();
    let section: String = text
        .lines()
        .skip_while(|l| *l != "# [upstream.tls]")
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let table: toml::Value = section.parse().unwrap();
    let tls = &table["upstream"]["tls"];
    let keys: BTreeSet<String> = tls.as_table().unwrap().keys().cloned().collect();
    let mut defaults = tls.clone();
    for example in ["server_name", "client_cert", "client_key", "alpn"] {
        defaults.as_table_mut().unwrap().remove(example);
    }
    let parsed: tether::config::TlsConfig = defaults.try_into().unwrap();
    assert_eq!(parsed, tether::config::TlsConfig::default());
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let part = readme
        .split("\n### ")
        .find(|p| p.starts_with("`[upstream.tls]`"))
        .expect("README has a [upstream.tls] reference");
    for key in keys {
        assert!(
            part.contains(&format!("| `{key}` |")),
            "README lacks tls.{key}"
        );
    }
}
