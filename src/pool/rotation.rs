//! Rotation of an upstream's TLS material: the CA files, the client
//! certificate and its key are looked at on every maintenance tick (and on a
//! reload); when one changed, they are read again into new rustls settings,
//! and the pooled connections made with the old ones roll over, each at its
//! own moment within `tls.rotation_window`, so the backend sees the new
//! certificate on every connection by the window's end without a burst of
//! full handshakes (a connection busy at its moment retires when its
//! exchange ends). No connection is used for a new request past the client
//! certificate it presented.
//!
//! New settings come with new, empty session caches: a resumed TLS 1.3
//! session carries the authentication of the handshake that made it, so a
//! ticket from the old material would let a new connection go on presenting
//! the old certificate (and skip checking the server against a new CA).
//!
//! Files that changed but cannot be used (a certificate with a key from
//! another pair, half-written, unreadable, or expired) leave the material in
//! use as it is; they are read again when they change again, and every few
//! seconds meanwhile. Files rewritten with the same bytes change nothing.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::ClientConfig;
use tokio::time::Instant;

use super::tls::{lock, UpstreamTls};
use crate::config::{read_certificates, FileLook, Protocol, TlsConfig};

/// Sessions cached per endpoint: rustls keeps up to eight TLS 1.3 tickets per
/// server name in an entry, so a few entries cover every name an endpoint is
/// dialled under.
const SESSIONS_PER_ENDPOINT: usize = 8;

/// Files that changed are read once they have looked the same for this long,
/// so a writer that truncates and then writes is not read half-way.
const SETTLE: Duration = Duration::from_millis(100);

/// A connection retires this long before its client certificate expires: a
/// retirement is seen at the next maintenance tick (1 s), and a last
/// request on a connection retiring peer-first must still go out in time.
pub(super) const BEFORE_CLIENT_CERT_EXPIRY: Duration = Duration::from_secs(2);

/// How often the maintenance ticks look at the files.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// A reading that was refused is tried again after this even if the files
/// look the same: a permission fixed with `chmod` or `chown` changes no
/// look, nor does a transient error.
const RETRY_REFUSED: Duration = Duration::from_secs(5);

/// The rustls settings made from one reading of the files.
pub(super) struct Material {
    /// Counts the readings that were put in use, from 0.
    pub(super) generation: u64,
    /// The settings, or why the files could not make them (every dial then
    /// fails with it).
    base: Result<Arc<ClientConfig>, String>,
    /// The settings per endpoint address, each with its own session cache.
    per_endpoint: Mutex<HashMap<SocketAddr, Arc<ClientConfig>>>,
    /// When the client certificate stops being valid (`notAfter`).
    pub(super) client_cert_expires: Option<SystemTime>,
}

impl Material {
    /// Reads the files of `tls` and builds their settings.
    pub(super) fn read(tls: &TlsConfig, protocol: Protocol, generation: u64) -> Self {
        let base = super::tls::build(tls, protocol)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        Self {
            generation,
            base,
            per_endpoint: Mutex::new(HashMap::new()),
            client_cert_expires: client_cert_expires(tls),
        }
    }

    /// Why the files could not make settings, if they could not.
    pub(super) fn problem(&self) -> Option<&str> {
        self.base.as_ref().err().map(String::as_str)
    }

    /// The settings for `addr`, with the endpoint's own session cache.
    pub(super) fn config_for(&self, addr: SocketAddr) -> Result<Arc<ClientConfig>, String> {
        let base = self.base.as_ref().map_err(Clone::clone)?;
        let mut configs = lock(&self.per_endpoint);
        let config = configs.entry(addr).or_insert_with(|| {
            let mut config = ClientConfig::clone(base);
            config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(
                SESSIONS_PER_ENDPOINT,
            )));
            Arc::new(config)
        });
        Ok(config.clone())
    }

    /// Whether the client certificate has expired or is within
    /// [`BEFORE_CLIENT_CERT_EXPIRY`] of it: no connection is made with it.
    pub(super) fn client_cert_spent(&self) -> bool {
        self.client_cert_expires
            .is_some_and(|expires| expires <= SystemTime::now() + BEFORE_CLIENT_CERT_EXPIRY)
    }

    /// Until when a connection dialled now may be used: just before the
    /// client certificate expires.
    pub(super) fn usable_until(&self) -> Option<Instant> {
        let expires = self.client_cert_expires?;
        let left = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(BEFORE_CLIENT_CERT_EXPIRY);
        Some(Instant::now() + left)
    }
}

/// When the client certificate of `tls` expires.
fn client_cert_expires(tls: &TlsConfig) -> Option<SystemTime> {
    let cert = tls.client_cert.as_ref()?;
    let chain = read_certificates(&cert.to_string_lossy()).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The looks of every file the material is read from.
fn look_all(files: &[PathBuf]) -> Vec<Option<FileLook>> {
    files.iter().map(|f| FileLook::at(f)).collect()
}

/// The bytes of every file the material is read from, to tell a rewrite
/// with the same contents (a `touch`, a periodic copy) from a rotation.
fn contents_of(files: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    files.iter().map(|f| std::fs::read(f).ok()).collect()
}

/// Where an upstream's material stands: which reading is in use, when the
/// earlier ones were replaced, and what the files looked like when last read.
pub(super) struct Rotations {
    files: Vec<PathBuf>,
    window: Duration,
    /// The generation of the material in use, mirrored for the request path.
    current: AtomicU64,
    /// `(generation, when it was replaced)`, oldest first; an entry goes once
    /// its window has passed (every connection of it has rolled over).
    replaced: Mutex<VecDeque<(u64, Instant)>>,
    /// The files as last read, whether or not they could be used.
    seen: Mutex<Vec<Option<FileLook>>>,
    /// The bytes of the files the material in use was read from.
    contents: Mutex<Vec<Option<Vec<u8>>>>,
    /// After a refused reading: when to read the files again even if they
    /// look the same (a permission fixed, a transient error gone).
    retry_at: Mutex<Option<Instant>>,
    /// A reading is under way.
    reading: AtomicBool,
    /// When the files were last looked at.
    looked_at: Mutex<Option<Instant>>,
    pub(super) applied: AtomicU64,
    pub(super) refused: AtomicU64,
}

impl Rotations {
    /// The rotations of material read from `tls`'s files, as they look now
    /// (looked at before they are read, so a change while reading is seen).
    pub(super) fn new(tls: &TlsConfig) -> Self {
        let files = tls.files();
        let seen = look_all(&files);
        let contents = contents_of(&files);
        Self {
            files,
            window: tls.rotation_window,
            current: AtomicU64::new(0),
            replaced: Mutex::new(VecDeque::new()),
            seen: Mutex::new(seen),
            contents: Mutex::new(contents),
            retry_at: Mutex::new(None),
            reading: AtomicBool::new(false),
            looked_at: Mutex::new(None),
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// When a connection dialled with material `generation` rolls over:
    /// `None` while that material is in use, else its own moment within the
    /// window that began when the material was replaced (`id` spreads the
    /// pool's connections over the window); now, for material replaced so
    /// long ago that its window has passed.
    pub(super) fn rollover_at(&self, generation: u64, id: u64) -> Option<Instant> {
        if generation >= self.current.load(Ordering::Acquire) {
            return None;
        }
        let replaced = lock(&self.replaced);
        match replaced.iter().find(|(g, _)| *g == generation) {
            Some((_, at)) => Some(*at + self.window.mul_f64(spread(id))),
            None => Some(Instant::now()),
        }
    }

    /// Records that generation `old` was replaced now, forgetting the
    /// replacements whose window has passed.
    fn replace(&self, old: u64) {
        let now = Instant::now();
        let mut replaced = lock(&self.replaced);
        while replaced
            .front()
            .is_some_and(|(_, at)| *at + self.window <= now)
        {
            replaced.pop_front();
        }
        replaced.push_back((old, now));
        // Published after the entry, so a connection of `old` finds it.
        self.current.store(old + 1, Ordering::Release);
    }
}

/// A fraction in [0, 1) that `id` maps to, evenly for consecutive ids
/// (splitmix64's finaliser).
fn spread(id: u64) -> f64 {
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Clears the reading flag however the reading ends, a panic included.
struct Reading<'a>(&'a AtomicBool);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl UpstreamTls {
    /// Looks at the files, at most once a second whoever asks (the
    /// maintenance of every worker's share does), and reads them again when
    /// one changed.
    pub(crate) fn check_files(self: &Arc<Self>) {
        let now = Instant::now();
        {
            let mut looked_at = lock(&self.rotations.looked_at);
            if looked_at.is_some_and(|at| now.duration_since(at) < LOOK_EVERY) {
                return;
            }
            *looked_at = Some(now);
        }
        self.check_files_now();
    }

    /// Looks at the files now; when one changed (or a refused reading is due
    /// again), reads them on a blocking thread, one reading at a time.
    /// Cheap when nothing changed: a `stat` and a path resolution per file.
    pub(crate) fn check_files_now(self: &Arc<Self>) {
        let rotations = &self.rotations;
        if rotations.files.is_empty() || rotations.reading.swap(true, Ordering::AcqRel) {
            return;
        }
        let reading = Reading(&rotations.reading);
        let looks = look_all(&rotations.files);
        let retry = lock(&rotations.retry_at).is_some_and(|at| Instant::now() >= at);
        if *lock(&rotations.seen) == looks && !retry {
            return;
        }
        std::mem::forget(reading);
        let tls = self.clone();
        let reread = move || {
            let _reading = Reading(&tls.rotations.reading);
            tls.reread(looks);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(reread)),
            Err(_) => reread(),
        }
    }

    /// Reads the files that looked like `looks` once they have settled, and
    /// puts the material they make in use, or keeps the old.
    fn reread(&self, looks: Vec<Option<FileLook>>) {
        let rotations = &self.rotations;
        std::thread::sleep(SETTLE);
        if look_all(&rotations.files) != looks {
            // Still being written: the next look reads it.
            return;
        }
        *lock(&rotations.seen) = looks;
        let contents = contents_of(&rotations.files);
        if *lock(&rotations.contents) == contents {
            // Rewritten with the same bytes: nothing to roll over.
            *lock(&rotations.retry_at) = None;
            return;
        }
        let old = self.material.load_full();
        let next = Material::read(&self.settings, self.protocol, old.generation + 1);
        if let Some(problem) = refusal(&next, &old) {
            rotations.refused.fetch_add(1, Ordering::Relaxed);
            *lock(&rotations.retry_at) = Some(Instant::now() + RETRY_REFUSED);
            tracing::warn!(upstream = %self.upstream(), error = %problem, retry_in = ?RETRY_REFUSED, "TLS files changed but cannot be used; keeping the ones in use");
            return;
        }
        *lock(&rotations.retry_at) = None;
        *lock(&rotations.contents) = contents;
        rotations.replace(old.generation);
        self.material.store(Arc::new(next));
        rotations.applied.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            upstream = %self.upstream(),
            generation = old.generation + 1,
            window = %humantime::format_duration(rotations.window),
            "TLS files changed: new connections use them, pooled ones roll over within the window"
        );
    }
}

/// Why newly read material must not replace `old`: it could not be built,
/// or its client certificate is expired (or about to be) while the one in
/// use is not — putting it in use would stop every new connection.
fn refusal(next: &Material, old: &Material) -> Option<String> {
    if let Some(problem) = next.problem() {
        return Some(problem.to_owned());
    }
    (next.client_cert_spent() && !old.client_cert_spent())
        .then(|| "the new client certificate has expired or is about to".to_owned())
}

/// Which material a connection was dialled with, and so when it rolls over.
#[derive(Clone)]
pub(crate) struct Lineage {
    tls: Arc<UpstreamTls>,
    generation: u64,
    /// Its rollover moment, once its material is replaced (fixed from then
    /// on, so it is worked out once).
    rollover: Arc<std::sync::OnceLock<Instant>>,
}

impl Lineage {
    /// Of a connection dialled with `material` of `tls`.
    pub(super) fn new(tls: Arc<UpstreamTls>, material: &Material) -> Self {
        Self {
            tls,
            generation: material.generation,
            rollover: Arc::default(),
        }
    }

    /// When the connection with `id` rolls over to newer material, if newer
    /// material is in use.
    pub(crate) fn rollover_at(&self, id: u64) -> Option<Instant> {
        if let Some(at) = self.rollover.get() {
            return Some(*at);
        }
        let at = self.tls.rotations.rollover_at(self.generation, id)?;
        Some(*self.rollover.get_or_init(|| at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_ids_spread_over_the_window() {
        let mut buckets = [0usize; 10];
        for id in 0..10_000u64 {
            let f = spread(id);
            assert!((0.0..1.0).contains(&f));
            buckets[(f * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (800..1200).contains(&n)),
            "{buckets:?}"
        );
    }

    #[test]
    fn connections_of_replaced_material_roll_over_within_the_window() {
        let tls = TlsConfig {
            rotation_window: Duration::from_secs(10),
            ..TlsConfig::default()
        };
        let rotations = Rotations::new(&tls);
        assert_eq!(rotations.rollover_at(0, 1), None, "material in use");
        let at = Instant::now();
        rotations.replace(0);
        for id in 0..100 {
            let when = rotations.rollover_at(0, id).unwrap();
            assert!(when >= at && when < at + Duration::from_secs(11));
        }
        assert_eq!(rotations.rollover_at(1, 7), None);
        assert_eq!(rotations.rollover_at(2, 7), None, "not yet published");
        // Many quick rotations: each generation keeps its own window.
        for g in 1..40 {
            rotations.replace(g);
        }
        let first = rotations.rollover_at(0, 3).unwrap();
        assert!(first < at + Duration::from_secs(11), "no sliding deadline");
        assert_eq!(lock(&rotations.replaced).len(), 40, "all within the window");
    }
}
