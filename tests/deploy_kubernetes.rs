//! The Kubernetes manifests under deploy/kubernetes/ stay deployable and keep
//! what makes tether a well-behaved sidecar: every manifest passes the API
//! schema (strict) and checkov with only the documented skips, every
//! kustomization lists exactly its directory's manifests, tether starts before
//! the app and stops after it in both variants, the grace period outlasts the
//! drain, every container is locked down, and the probes run `tether health`.
//!
//! The validators are Python tools; CI installs them with pip. A missing tool
//! fails the test with the package to install, it never skips it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{files_under, printed, repo, yaml_documents};
use serde_norway::Value;
use tether::config::Config;

const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const CHECKOV: &str = "checkov==3.3.30";
/// Current Kubernetes releases the manifests must validate against.
const CURRENT_VERSIONS: [&str; 2] = ["1.34.0", "1.37.0"];
/// Native sidecars (restartPolicy Always on an init container) are on by
/// default from 1.29.
const NATIVE_FLOOR: &str = "1.29.0";
/// The oldest schema kubernetes-validate 1.37.0 bundles: the legacy variant is
/// for old clusters.
const LEGACY_FLOOR: &str = "1.25.0";
const NATIVE: &str = "native-sidecar";
const LEGACY: &str = "legacy-sidecar";
const TETHER_BIN: &str = "/usr/local/bin/tether";
const UID: i64 = 10001;

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// Every YAML file under `dir`, recursively, sorted. Dotfiles (and what is
/// under dot-folders) are tool settings (.checkov.yaml), not manifests.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            let hidden = path
                .strip_prefix(dir)
                .unwrap()
                .components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            let name = path.to_string_lossy();
            !hidden && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
        .collect()
}

fn is_kustomization(path: &Path) -> bool {
    matches!(
        path.file_name().and_then(|n| n.to_str()),
        Some("kustomization.yaml" | "kustomization.yml" | "Kustomization")
    )
}

/// The Kubernetes manifests: every YAML file but the kustomizations.
fn manifests() -> Vec<PathBuf> {
    let files: Vec<PathBuf> = yaml_files(&kube_dir())
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .collect();
    assert!(files.len() >= 4, "too few manifests found: {files:?}");
    files
}

fn str_list(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|item| item.as_str().expect("a list of strings").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The kustomization in `dir` and the resources it lists, each an existing
/// file or a directory with a kustomization of its own.
fn kustomization_resources(dir: &Path) -> Vec<PathBuf> {
    let path = dir.join("kustomization.yaml");
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    let kustomization = &docs[0];
    assert_eq!(
        kustomization["kind"].as_str(),
        Some("Kustomization"),
        "{}",
        path.display()
    );
    let resources = str_list(&kustomization["resources"]);
    assert!(!resources.is_empty(), "{}: no resources", path.display());
    resources
        .iter()
        .map(|r| {
            let p = dir.join(r);
            assert!(
                p.is_file() || p.join("kustomization.yaml").is_file(),
                "{} lists {r}, which is neither a file nor a kustomization directory",
                path.display()
            );
            p
        })
        .collect()
}

/// What `kustomize build dir` would output, for kustomizations that only list
/// resources (no patches, no generators).
fn render(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for resource in kustomization_resources(dir) {
        if resource.is_dir() {
            out.extend(render(&resource));
        } else {
            out.extend(yaml_documents(&resource));
        }
    }
    out
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// One variant, as kustomize would render it.
struct Variant {
    name: &'static str,
    deployment: Value,
    config_map: Value,
    service: Value,
}

impl Variant {
    fn load(name: &'static str) -> Self {
        let docs = render(&kube_dir().join(name));
        Self {
            name,
            deployment: find(&docs, "Deployment").clone(),
            config_map: find(&docs, "ConfigMap").clone(),
            service: find(&docs, "Service").clone(),
        }
    }

    fn pod(&self) -> &Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    fn containers(&self) -> Vec<&Value> {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|list| self.pod()[*list].as_sequence().into_iter().flatten())
            .collect()
    }

    /// tether's container and the list it is in.
    fn tether(&self) -> (&'static str, &Value) {
        let mut found = Vec::new();
        for list in ["initContainers", "containers"] {
            for c in self.pod()[list].as_sequence().into_iter().flatten() {
                if c["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("tether:"))
                {
                    found.push((list, c));
                }
            }
        }
        assert_eq!(found.len(), 1, "{}: one tether container", self.name);
        found[0]
    }

    fn app(&self) -> &Value {
        let apps: Vec<&Value> = self.pod()["containers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|c| c["name"].as_str() != Some("tether"))
            .collect();
        assert_eq!(apps.len(), 1, "{}: one app container", self.name);
        apps[0]
    }

    /// The tether.toml in the ConfigMap, loaded as tether loads it.
    fn tether_config(&self) -> Config {
        let text = self.config_map["data"]["tether.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap has no data.tether.toml", self.name));
        Config::from_toml(text).unwrap_or_else(|e| panic!("{}: tether.toml: {e}", self.name))
    }

    fn grace_period(&self) -> Duration {
        let seconds = self.pod()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: set terminationGracePeriodSeconds", self.name));
        Duration::from_secs(seconds)
    }
}

/// Runs a validator; a missing one fails with the pip package to install.
fn run(mut command: Command, package: &str) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): install it with `pip install {package}`")
    })
}

fn kubernetes_validate(version: &str, files: &[PathBuf]) {
    let mut command = Command::new("kubernetes-validate");
    command.args(["--strict", "-k", version]).args(files);
    let out = run(command, KUBERNETES_VALIDATE);
    let text = printed(&out);
    assert!(
        out.status.success(),
        "kubernetes-validate {version}:\n{text}"
    );
    // An unknown kind is only a warning with exit 0: demand a pass for every
    // document instead.
    for file in files {
        let expected = yaml_documents(file).len();
        let passed = text
            .lines()
            .filter(|l| l.starts_with("INFO") && l.contains(&format!("{} passed", file.display())))
            .count();
        assert_eq!(
            passed,
            expected,
            "{} has {expected} documents, {passed} passed against {version}:\n{text}",
            file.display()
        );
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("WARN") || l.starts_with("ERROR")),
        "kubernetes-validate {version}:\n{text}"
    );
}

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let all = manifests();
    for version in CURRENT_VERSIONS {
        kubernetes_validate(version, &all);
    }
    let under = |dir: &str| -> Vec<PathBuf> {
        let root = kube_dir().join(dir);
        all.iter()
            .filter(|p| p.starts_with(&root))
            .cloned()
            .collect()
    };
    // Each variant also validates on the oldest cluster it is meant for.
    let mut legacy = under("base");
    legacy.extend(under(LEGACY));
    kubernetes_validate(LEGACY_FLOOR, &legacy);
    let mut native = under("base");
    native.extend(under(NATIVE));
    kubernetes_validate(NATIVE_FLOOR, &native);
}

#[test]
fn kustomizations_list_exactly_the_manifests_beside_them() {
    let dirs: Vec<PathBuf> = yaml_files(&kube_dir())
        .into_iter()
        .filter(|p| is_kustomization(p))
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    for dir in &dirs {
        let listed = kustomization_resources(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let manifest = (name.ends_with(".yaml") || name.ends_with(".yml"))
                && !name.starts_with('.')
                && !is_kustomization(&path);
            assert!(
                !manifest || listed.contains(&path),
                "{} does not list {name}",
                dir.join("kustomization.yaml").display()
            );
        }
    }
    for manifest in manifests() {
        assert!(
            dirs.iter().any(|d| manifest.parent() == Some(d.as_path())),
            "{} is in no kustomization's directory",
            manifest.display()
        );
    }
    // Both variants share one ConfigMap and one Service.
    let (native, legacy) = (Variant::load(NATIVE), Variant::load(LEGACY));
    assert_eq!(native.config_map, legacy.config_map);
    assert_eq!(native.service, legacy.service);
}

#[test]
fn checkov_reports_no_failure_beyond_the_documented_skips() {
    let settings = kube_dir().join(".checkov.yaml");
    // Every skip carries its reason in the comment above it.
    let text = std::fs::read_to_string(&settings).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let skips = str_list(&yaml_documents(&settings)[0]["skip-check"]);
    assert!(!skips.is_empty(), "{}: no skip-check", settings.display());
    for skip in &skips {
        let at = lines
            .iter()
            .position(|l| *l == format!("- {skip}"))
            .unwrap_or_else(|| panic!("{skip}: write one skip per line"));
        assert!(
            at > 0 && lines[at - 1].starts_with('#'),
            "{}: say why {skip} is skipped in a comment above it",
            settings.display()
        );
    }

    let mut command = Command::new("checkov");
    command
        .arg("--config-file")
        .arg(&settings)
        .arg("--directory")
        .arg(kube_dir())
        .args(["--framework", "kubernetes", "--output", "json"])
        // Nothing to fetch: no platform account, no network.
        .arg("--skip-download");
    let out = run(command, CHECKOV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON report ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // One framework gives one report; guard against a list of them.
    let reports = match report {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    let mut passed = 0;
    for report in &reports {
        let summary = &report["summary"];
        let failed: Vec<String> = report["results"]["failed_checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} {} ({} {})",
                    c["check_id"].as_str().unwrap_or("?"),
                    c["check_name"].as_str().unwrap_or("?"),
                    c["resource"].as_str().unwrap_or("?"),
                    c["file_path"].as_str().unwrap_or("?"),
                )
            })
            .collect();
        assert!(
            failed.is_empty(),
            "checkov failures (fix them, or skip with a reason in {}):\n{}",
            settings.display(),
            failed.join("\n")
        );
        assert_eq!(summary["failed"], 0, "{summary}");
        assert_eq!(summary["parsing_errors"], 0, "{summary}");
        passed += summary["passed"].as_u64().unwrap_or(0);
    }
    assert!(out.status.success(), "checkov exited {}", out.status);
    // Dozens of checks apply to each Deployment: a handful means checkov saw
    // no manifest.
    assert!(passed >= 100, "checkov passed only {passed} checks");
}

#[test]
fn native_variant_runs_tether_as_an_init_container_that_holds_the_app_until_ready() {
    let native = Variant::load(NATIVE);
    let (list, tether) = native.tether();
    assert_eq!(list, "initContainers", "tether is a native sidecar");
    assert_eq!(
        tether["restartPolicy"].as_str(),
        Some("Always"),
        "an init container without restartPolicy Always blocks the app forever"
    );
    assert!(
        tether["startupProbe"].is_mapping(),
        "without a startup probe the app starts before tether is ready"
    );
    assert!(
        tether["lifecycle"]["preStop"].is_null(),
        "a native sidecar gets SIGTERM after the app exits: a preStop delay only slows shutdown"
    );
}

#[test]
fn legacy_variant_starts_tether_first_and_stops_it_after_the_app() {
    let legacy = Variant::load(LEGACY);
    let (list, tether) = legacy.tether();
    assert_eq!(list, "containers");
    assert!(tether["restartPolicy"].is_null());
    assert_eq!(
        legacy.pod()["containers"][0]["name"].as_str(),
        Some("tether"),
        "containers start in order: tether comes first"
    );
    assert!(
        tether["lifecycle"]["postStart"]["exec"]["command"]
            .as_sequence()
            .is_some_and(|c| c.iter().any(|a| a
                .as_str()
                .is_some_and(|a| a.contains("tether health --ready")))),
        "tether's postStart hook holds the app back until tether is ready"
    );
    prestop_sleep(&legacy).expect("the legacy variant's tether has a preStop sleep");
}

/// The legacy variant's preStop delay: exec ["sleep", N].
fn prestop_sleep(variant: &Variant) -> Option<Duration> {
    let command = str_list(&variant.tether().1["lifecycle"]["preStop"]["exec"]["command"]);
    match command.as_slice() {
        [] => None,
        [sleep, seconds] if sleep == "sleep" || sleep.ends_with("/sleep") => {
            Some(Duration::from_secs(seconds.parse().unwrap_or_else(|_| {
                panic!("preStop sleep {seconds:?} is not whole seconds")
            })))
        }
        other => panic!(
            "{}: preStop should be [\"sleep\", N], is {other:?}",
            variant.name
        ),
    }
}

#[test]
fn grace_period_outlasts_the_prestop_delay_and_the_drain() {
    for variant in [Variant::load(NATIVE), Variant::load(LEGACY)] {
        let drain = variant.tether_config().runtime.drain_timeout;
        let delay = prestop_sleep(&variant).unwrap_or_default();
        assert!(
            variant.grace_period() > drain + delay,
            "{}: terminationGracePeriodSeconds {:?} must exceed drain_timeout {drain:?} \
             plus the preStop sleep {delay:?}, or the kubelet kills tether mid-drain",
            variant.name,
            variant.grace_period()
        );
    }
}

#[test]
fn pod_and_every_container_are_locked_down() {
    for variant in [Variant::load(NATIVE), Variant::load(LEGACY)] {
        let name = variant.name;
        let pod = &variant.pod()["securityContext"];
        assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true), "{name}: pod");
        assert_eq!(pod["runAsUser"].as_i64(), Some(UID), "{name}: pod");
        assert_eq!(pod["runAsGroup"].as_i64(), Some(UID), "{name}: pod");
        assert_eq!(
            pod["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{name}: pod"
        );
        assert_eq!(
            variant.pod()["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{name}: no container needs the API"
        );
        let containers = variant.containers();
        assert_eq!(containers.len(), 2, "{name}: tether and the app");
        for c in containers {
            let at = format!("{name}: container {}", c["name"].as_str().unwrap_or("?"));
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{at}");
            assert_eq!(sc["runAsUser"].as_i64(), Some(UID), "{at}");
            assert_eq!(sc["runAsGroup"].as_i64(), Some(UID), "{at}");
            assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{at}");
            assert_eq!(
                sc["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{at}"
            );
            assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"], "{at}");
            assert!(sc["capabilities"]["add"].is_null(), "{at}");
            assert_eq!(
                sc["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault"),
                "{at}"
            );
            assert!(sc["privileged"].as_bool() != Some(true), "{at}");
            let resources = &c["resources"];
            for key in ["cpu", "memory"] {
                assert!(
                    resources["requests"][key].is_string(),
                    "{at}: requests.{key}"
                );
            }
            assert!(
                resources["limits"]["memory"].is_string(),
                "{at}: limits.memory"
            );
        }
    }
}

/// `--timeout`'s value in a probe command, or tether health's default.
fn health_timeout(command: &[String]) -> Duration {
    command
        .iter()
        .position(|a| a == "--timeout")
        .map(|i| humantime::parse_duration(&command[i + 1]).expect("--timeout DURATION"))
        .unwrap_or(Duration::from_secs(2))
}

#[test]
fn probes_run_tether_health_against_the_configured_admin_address() {
    for variant in [Variant::load(NATIVE), Variant::load(LEGACY)] {
        let name = variant.name;
        let (_, tether) = variant.tether();
        let admin = variant.tether_config().admin;
        assert!(admin.enabled, "{name}: the probes need the admin server");
        assert!(
            admin.listen.ip().is_loopback(),
            "{name}: /config must stay on loopback"
        );
        for (probe, ready) in [
            ("livenessProbe", false),
            ("readinessProbe", true),
            ("startupProbe", true),
        ] {
            let at = format!("{name}: tether's {probe}");
            let spec = &tether[probe];
            let command = str_list(&spec["exec"]["command"]);
            assert_eq!(
                command.get(..2),
                Some(&[TETHER_BIN.to_owned(), "health".to_owned()][..]),
                "{at}: {command:?}"
            );
            assert_eq!(
                command.iter().any(|a| a == "--ready"),
                ready,
                "{at}: liveness asks /healthz, readiness and startup /readyz"
            );
            // The binary's default admin address, unless the probe names one.
            let target = command
                .iter()
                .position(|a| a == "--admin")
                .map_or("127.0.0.1:9901", |i| command[i + 1].as_str());
            assert_eq!(
                target,
                admin.listen.to_string(),
                "{at}: wrong admin address"
            );
            // The kubelet's timeout (default 1s) must leave tether time to say
            // why the check failed.
            let kubelet = Duration::from_secs(spec["timeoutSeconds"].as_u64().unwrap_or(1));
            assert!(
                health_timeout(&command) < kubelet,
                "{at}: --timeout must be below timeoutSeconds"
            );
        }
    }
}

#[test]
fn config_map_is_mounted_read_only_as_the_directory_etc_tether() {
    for variant in [Variant::load(NATIVE), Variant::load(LEGACY)] {
        let name = variant.name;
        let (_, tether) = variant.tether();
        let mounts: Vec<&Value> = tether["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|m| m["mountPath"].as_str() == Some("/etc/tether"))
            .collect();
        assert_eq!(mounts.len(), 1, "{name}: mount the config at /etc/tether");
        let mount = mounts[0];
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{name}");
        assert!(
            mount["subPath"].is_null(),
            "{name}: a subPath mount never sees ConfigMap edits"
        );
        let volume = variant.pod()["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{name}: no volume for the config mount"));
        assert_eq!(
            volume["configMap"]["name"], variant.config_map["metadata"]["name"],
            "{name}: the mount is the ConfigMap"
        );
        let command: Vec<String> = [&tether["command"], &tether["args"]]
            .into_iter()
            .flat_map(str_list)
            .collect();
        assert_eq!(
            command,
            [TETHER_BIN, "run", "--config", "/etc/tether/tether.toml"],
            "{name}"
        );
    }
}

#[test]
fn app_points_at_tethers_listener_and_the_service_at_the_app() {
    for variant in [Variant::load(NATIVE), Variant::load(LEGACY)] {
        let name = variant.name;
        let config = variant.tether_config();
        let listen = config.listeners[0].listen.to_string();
        assert_eq!(
            listen, "127.0.0.1:8080",
            "{name}: the listener stays on loopback"
        );
        let app = variant.app();
        let url = app["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some("BACKEND_URL"))
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name}: the app has no BACKEND_URL"));
        assert_eq!(url, format!("http://{listen}"), "{name}");
        // The Service reaches the app's own port, never tether's.
        let selector = &variant.service["spec"]["selector"];
        let labels = &variant.deployment["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector.as_mapping().expect("a Service selector") {
            assert_eq!(&labels[k.as_str().unwrap()], v, "{name}: selector {k:?}");
        }
        let target = &variant.service["spec"]["ports"][0]["targetPort"];
        let ports = app["ports"].as_sequence().expect("the app's ports");
        assert!(
            ports
                .iter()
                .any(|p| &p["name"] == target || &p["containerPort"] == target),
            "{name}: the Service's targetPort {target:?} is not an app port"
        );
        let endpoints = &config.upstreams[0].endpoints;
        assert!(
            endpoints.iter().all(|e| e.contains(".svc.cluster.local:")),
            "{name}: the upstream is a Service name: {endpoints:?}"
        );
    }
}
