//! Warm pools, one per (backend, language): sandboxes fully isolated, the
//! runtime and guest SDK loaded, no tenant data, each waiting to be bound
//! to exactly one execution and destroyed after it.
//!
//! Each pool is fed by its backend's [`Template`] (the process backend's
//! python zygote; a golden snapshot later), or prepared cold when the
//! backend has none. Refilling runs on one long-lived thread and only while
//! a worker is free, so it never competes with executions for the CPU.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use airlock_backend::{Backend, Backends, Extras, Prepared, Spec, Template};
use airlock_policy::{Language, Policy};

use crate::metrics::{Metrics, PoolLabel};

/// Where the guest SDKs appear inside every sandbox (read-only).
pub const GUEST_MOUNT: &str = "/opt/airlock";

/// What the pools hold.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// The policy warm sandboxes are built with (the server's base policy;
    /// executions whose policy only tightens its limits use them too).
    pub policy: Policy,
    /// Idle sandboxes to keep per language, on every backend named in
    /// `backends`.
    pub targets: Vec<(Language, usize)>,
    /// Backends that keep pools (by name; default: every offered one).
    pub backends: Option<Vec<String>>,
}

type Key = (&'static str, Language);

fn label(key: Key) -> PoolLabel {
    PoolLabel {
        backend: key.0.into(),
        language: key.1.as_str().into(),
    }
}

/// Whether `want` is the pool's policy with limits at most as high
/// (each one), and the same open-file limit: a prestarted program already
/// holds it as an rlimit.
fn only_tightens(base: &Policy, want: &Policy) -> bool {
    let (b, w) = (&base.limits, &want.limits);
    let mut same = want.clone();
    same.limits = b.clone();
    // A minimum isolation the request adds was met when its backend was
    // chosen (and the backend checks it again): the pool of that backend
    // serves it as it serves the base policy.
    same.isolation.minimum = base.isolation.minimum;
    same == *base
        && w.wall_time_ms <= b.wall_time_ms
        && w.cpu_time_ms <= b.cpu_time_ms
        && w.memory_mib <= b.memory_mib
        && w.pids <= b.pids
        && w.cpus <= b.cpus
        && w.stdout_bytes <= b.stdout_bytes
        && w.stderr_bytes <= b.stderr_bytes
        && w.stdin_bytes <= b.stdin_bytes
        && w.code_bytes <= b.code_bytes
        && w.open_files == b.open_files
}

/// A template and when to try again after it failed.
struct Source {
    template: Option<Arc<dyn Template>>,
    retry: Instant,
}

/// The pools of one node.
pub(crate) struct Pools {
    spec: PoolSpec,
    backends: Backends,
    metrics: Arc<Metrics>,
    guest: Vec<(String, Arc<str>)>,
    idle: Mutex<HashMap<Key, VecDeque<Box<dyn Prepared>>>>,
    /// Templates, shared with the workers: when a pool is empty, an
    /// execution is made from a fast template on demand.
    sources: Mutex<HashMap<Key, Source>>,
    wake: Condvar,
    stop: Mutex<bool>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Records one more failure of a pool: it waits 1 s, doubling to 60 s,
/// before the next attempt. Returns the wait.
fn back_off(backoff: &mut HashMap<Key, (Instant, Duration)>, key: Key) -> Duration {
    let wait = backoff.get(&key).map_or(Duration::from_secs(1), |(_, w)| {
        (*w * 2).min(Duration::from_secs(60))
    });
    backoff.insert(key, (Instant::now() + wait, wait));
    wait
}

/// The extras every sandbox of `lang` gets from the platform: the guest
/// SDK, a broker channel, the language's runner, and how it runs.
pub(crate) fn extras(
    guest: &[(String, Arc<str>)],
    lang: Language,
    mode: &str,
    egress: bool,
) -> Extras {
    let mut x = Extras {
        broker: true,
        egress,
        ..Extras::default()
    };
    if !guest.is_empty() {
        x.files.extend(guest.iter().cloned());
        x.entry = match lang {
            Language::Python => Some(format!("{GUEST_MOUNT}/python/runner.py")),
            Language::Javascript => Some(format!("{GUEST_MOUNT}/javascript/runner.js")),
            Language::Shell => None,
        };
    }
    x.env.push(("AIRLOCK_MODE".into(), mode.into()));
    x
}

impl Pools {
    pub(crate) fn new(
        spec: PoolSpec,
        backends: Backends,
        metrics: Arc<Metrics>,
        guest: Vec<(String, Arc<str>)>,
    ) -> Self {
        Pools {
            spec,
            backends,
            metrics,
            guest,
            idle: Mutex::new(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
            stop: Mutex::new(false),
        }
    }

    /// Every pool this node keeps, with its target.
    fn keys(&self) -> Vec<(Arc<dyn Backend>, Language, usize)> {
        let mut v = Vec::new();
        for b in self.backends.all() {
            for (lang, n) in &self.spec.targets {
                if self.pooled(b.name(), *lang) && b.runs(*lang) {
                    v.push((b.clone(), *lang, *n));
                }
            }
        }
        v
    }

    fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the refill thread to look again.
    pub(crate) fn wake(&self) {
        self.wake.notify_all();
    }

    /// Stops the refill loop; idle sandboxes are destroyed by [`Pools::clear`].
    pub(crate) fn stop(&self) {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Destroys every idle sandbox and template.
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Keeps every pool at its target while `may_make()` (a worker is
    /// free and the node accepts work). Runs on its own long-lived thread:
    /// sandboxes and templates die with the thread that made them.
    pub(crate) fn refill_loop(&self, may_make: &dyn Fn() -> bool) {
        // After a failure a pool waits (1 s, doubling to 60 s) before the
        // next attempt: a missing runtime must not spin or flood logs.
        let mut backoff: HashMap<Key, (Instant, Duration)> = HashMap::new();
        let keys = self.keys();
        loop {
            if self.stopping() {
                return;
            }
            for (backend, lang, target) in &keys {
                let key = (backend.name(), *lang);
                if backoff
                    .get(&key)
                    .is_some_and(|(until, _)| Instant::now() < *until)
                {
                    continue;
                }
                // Sandboxes that died idle are dropped here; if they keep
                // dying, the pool backs off like a failed creation.
                let died = {
                    let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                    let q = idle.entry(key).or_default();
                    let before = q.len();
                    q.retain(|sb| sb.is_alive());
                    before - q.len()
                };
                if died > 0 {
                    self.metrics
                        .pool_discarded
                        .get_or_create(&label(key))
                        .inc_by(died as u64);
                    let wait = back_off(&mut backoff, key);
                    tracing::warn!(
                        backend = key.0,
                        language = lang.as_str(),
                        died,
                        retry_in_s = wait.as_secs(),
                        "warm sandboxes died while idle"
                    );
                    continue;
                }
                loop {
                    let have = self.idle_count(key);
                    self.metrics
                        .pool_size
                        .get_or_create(&label(key))
                        .set(have as i64);
                    if have >= *target || self.stopping() || !may_make() {
                        break;
                    }
                    let t = Instant::now();
                    let template = self.keep_template(backend, *lang);
                    let made = template
                        .spawn()
                        .and_then(|mut sb| sb.prestart().map(|_| sb));
                    self.publish_spawned(key, Some(template.as_ref()));
                    match made {
                        Ok(sb) => {
                            backoff.remove(&key);
                            self.metrics.pool_create.observe(t.elapsed().as_secs_f64());
                            self.idle
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(key)
                                .or_default()
                                .push_back(sb);
                        }
                        Err(e) => {
                            let wait = back_off(&mut backoff, key);
                            tracing::warn!(
                                backend = key.0, language = lang.as_str(), error = %e,
                                retry_in_s = wait.as_secs(), "warm sandbox creation failed"
                            );
                            break;
                        }
                    }
                }
            }
            let g = self.stop.lock().unwrap_or_else(|p| p.into_inner());
            if *g {
                return;
            }
            let _ = self.wake.wait_timeout(g, Duration::from_millis(500));
        }
    }

    fn idle_count(&self, key: Key) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map_or(0, VecDeque::len)
    }

    fn spec_extras(&self, lang: Language) -> Extras {
        extras(&self.guest, lang, "pooled", false)
    }

    /// The pool's template: kept while healthy, replaced once it is not
    /// (a zygote that died or forked its share), and, when the backend has
    /// none or it failed (then retried a minute later), cold preparation.
    fn keep_template(&self, backend: &Arc<dyn Backend>, lang: Language) -> Arc<dyn Template> {
        let key = (backend.name(), lang);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let src = sources.entry(key).or_insert_with(|| Source {
            template: None,
            retry: Instant::now(),
        });
        if src.template.as_ref().is_some_and(|t| !t.healthy()) {
            // Retired: a zygote exits once the sandboxes it forked have ended.
            src.template = None;
        }
        if let Some(t) = &src.template {
            return t.clone();
        }
        let extras = self.spec_extras(lang);
        let spec = Spec {
            policy: &self.spec.policy,
            language: lang,
            extras: &extras,
        };
        let cold = || airlock_backend::cold_template(backend.clone(), &spec);
        if Instant::now() < src.retry {
            return cold();
        }
        match backend.template(&spec) {
            Ok(Some(t)) => {
                tracing::info!(
                    backend = key.0,
                    language = lang.as_str(),
                    "pool template started"
                );
                src.template = Some(t.clone());
                t
            }
            Ok(None) => {
                let t = cold();
                src.template = Some(t.clone());
                t
            }
            Err(e) => {
                src.retry = Instant::now() + Duration::from_secs(60);
                tracing::warn!(
                    backend = key.0, language = lang.as_str(), error = %e,
                    "no pool template; warm sandboxes start cold"
                );
                cold()
            }
        }
    }

    /// Publishes how many sandboxes a pool's template has made (after
    /// every one, so the gauge never lags behind the pool).
    fn publish_spawned(&self, key: Key, template: Option<&dyn Template>) {
        self.metrics
            .pool_zygote_forks
            .get_or_create(&label(key))
            .set(
                template
                    .filter(|t| t.is_fast())
                    .map_or(0, |t| t.spawned() as i64),
            );
    }

    /// Whether `backend` keeps a pool for `lang`.
    fn pooled(&self, backend: &str, lang: Language) -> bool {
        self.spec
            .targets
            .iter()
            .any(|(l, n)| *l == lang && *n > 0 && *l != Language::Shell)
            && self
                .spec
                .backends
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n == backend))
    }

    /// Whether an execution with `policy` (code and input sizes in
    /// `handshake`, JSON bytes) can be served from a pool.
    fn fits(&self, policy: &Policy, handshake: usize) -> bool {
        only_tightens(&self.spec.policy, policy)
            && !policy.network.is_proxy()
            // The code travels in one broker reply (at most 1 MiB): big
            // code and input start cold instead.
            && handshake <= airlock_broker::MAX_FRAME / 2
    }

    /// A warm sandbox for this execution, when one fits it exactly: from
    /// the pool, else made now from a fast template. None: start cold.
    pub(crate) fn take(
        &self,
        backend: &Arc<dyn Backend>,
        lang: Language,
        policy: &Policy,
        handshake: usize,
    ) -> Option<Box<dyn Prepared>> {
        let key = (backend.name(), lang);
        if !self.pooled(backend.name(), lang) {
            return None;
        }
        if !self.fits(policy, handshake) {
            self.metrics.pool_misses.get_or_create(&label(key)).inc();
            return None;
        }
        let got = loop {
            let next = self
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&key)
                .and_then(VecDeque::pop_front);
            match next {
                Some(mut sb) if sb.is_alive() => {
                    if policy.limits == self.spec.policy.limits {
                        break Some(sb);
                    }
                    // Tighter limits, applied now that it is bound.
                    match sb.tighten(&policy.limits) {
                        Ok(()) => break Some(sb),
                        Err(e) => {
                            tracing::debug!(error = %e, "warm sandbox not tightened; starting cold");
                            self.metrics.pool_discarded.get_or_create(&label(key)).inc();
                            drop(sb);
                            self.metrics.pool_misses.get_or_create(&label(key)).inc();
                            self.wake();
                            return None;
                        }
                    }
                }
                Some(dead) => {
                    // Died while idle: destroyed here, never used.
                    self.metrics.pool_discarded.get_or_create(&label(key)).inc();
                    drop(dead);
                }
                None => break None,
            }
        };
        match &got {
            Some(_) => self.metrics.pool_hits.get_or_create(&label(key)).inc(),
            None => self.metrics.pool_misses.get_or_create(&label(key)).inc(),
        };
        self.wake();
        if got.is_some() {
            return got;
        }
        // Empty pool: a sandbox from a fast template (a zygote fork) is
        // still far cheaper than a cold start, and just as isolated.
        let template = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .and_then(|s| s.template.clone())
            .filter(|t| t.is_fast() && t.healthy())?;
        let made = template
            .spawn()
            .and_then(|mut sb| sb.prestart().map(|_| sb));
        self.publish_spawned(key, Some(template.as_ref()));
        match made {
            Ok(sb) => {
                self.metrics.pool_zygote_on_demand.inc();
                Some(sb)
            }
            Err(e) => {
                tracing::warn!(backend = key.0, error = %e, "template spawn failed; starting cold");
                None
            }
        }
    }
}
