//! airlock-backend: the isolation seam.
//!
//! Owns: the [`Backend`] trait every isolation technology implements (the
//! process sandbox today; OCI runtimes, gVisor and microVMs beside it), the
//! ordered [`IsolationLevel`]s, and [`Backends`]: the set a node offers and
//! the choice of the cheapest one that meets a request's minimum.
//!
//! The life of one sandbox, on every backend:
//! 1. [`Backend::validate`]: the request against the policy and what this
//!    backend can enforce, before anything starts;
//! 2. [`Backend::prepare`] (or [`Template::spawn`] for a pool): build and
//!    isolate it, nothing tenant-specific inside, every layer applied;
//! 3. [`Prepared::execute`]: bind exactly one job (code, stdin, the broker
//!    and egress channels taken from it), run it, collect the result;
//! 4. the returned [`Teardown`] destroys it and reaps every trace, off the
//!    request path; [`Backend::reap`] does the same after a crash.
//!
//! Must never: let anything outside a backend depend on which backend runs
//! (callers see only these traits and the result's `enforced`); run a
//! policy weaker than asked (a layer a backend cannot enforce refuses the
//! request unless the policy names the dangerous `record_dangerous`); offer
//! a backend the operator did not configure.
//!
//! Threads: backends are synchronous. A sandbox may die with the thread
//! that created it (PR_SET_PDEATHSIG follows the spawning thread), so
//! callers prepare sandboxes from long-lived threads.

pub mod image;
pub mod microvm;
pub mod oci;
pub mod process;
mod snapshot;

use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use airlock_policy::{IsolationLevel, Language, MissingLayers, Policy};
pub use airlock_sandbox::{
    CancelToken, Enforced, Extras, Request, RunResult, SandboxError, Stream, TerminationReason,
};

/// Why a backend could not validate, build or run a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The process sandbox (or an agent speaking its protocol) failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The policy asks for layers this backend cannot enforce, and does not
    /// allow running without them.
    #[error("the {backend} backend cannot enforce {}", layers.join(", "))]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The layers, as policy field names.
        layers: Vec<String>,
    },
    /// No offered backend meets the requested isolation level (or the one
    /// named is not offered).
    #[error("{wanted} is not offered here (offered: {})", offered.join(", "))]
    Unavailable {
        /// What was asked: a level (`isolation gvisor`) or a backend name.
        wanted: String,
        /// What this node offers, as `name (level)`.
        offered: Vec<String>,
    },
}

impl BackendError {
    /// A message safe to show to a tenant: the failing layer or the missing
    /// capability, never a host path or an internal detail.
    pub fn public_message(&self) -> String {
        match self {
            BackendError::Sandbox(e) => e.public_message(),
            other => other.to_string(),
        }
    }
}

/// What the sandbox gets besides its policy: its language and what the
/// platform adds (guest SDK files, a broker channel, an entry runner, an
/// egress channel). Nothing tenant-specific.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    /// The policy every layer is built from.
    pub policy: &'a Policy,
    /// The language runtime.
    pub language: Language,
    /// The platform's additions.
    pub extras: &'a Extras,
}

/// The job bound to a prepared sandbox: the only tenant data it receives
/// (besides what the broker hands out).
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The code, copied into the sandbox's scratch space.
    pub code: &'a [u8],
    /// Preferred script name (a plain basename, else `main.<ext>`).
    pub file_name: Option<&'a str>,
    /// The program's stdin.
    pub stdin: &'a [u8],
}

/// What the caller hears while a job runs.
#[allow(missing_debug_implementations)]
pub struct Hooks<'a> {
    /// Every captured chunk of output, as it arrives (must not block long).
    pub on_output: &'a mut dyn FnMut(Stream, &[u8]),
    /// Once the clocks run and before the program gets its job: attach the
    /// broker here (a prestarted runner waits for it).
    pub on_start: &'a mut dyn FnMut(),
    /// Another thread's kill switch.
    pub cancel: &'a CancelToken,
}

/// What is left of a sandbox once its result is known: processes sent
/// SIGKILL, host state still to remove. Dropping it waits until every
/// process is gone and removes everything (any thread may drop it).
pub struct Teardown {
    // Held only to be dropped: its Drop impl does the destruction.
    _inner: Box<dyn Send>,
}

impl Teardown {
    /// Wraps whatever a backend drops to destroy a sandbox.
    pub fn new(inner: impl Send + 'static) -> Self {
        Teardown {
            _inner: Box::new(inner),
        }
    }
}

impl fmt::Debug for Teardown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Teardown")
    }
}

/// A sandbox with every layer applied, waiting for exactly one job.
/// Dropping it unused destroys it.
pub trait Prepared: Send + fmt::Debug {
    /// The layers it enforces (named backend and level included).
    fn enforced(&self) -> &Enforced;
    /// Starts the program before its job (a warm pool's runner, which then
    /// waits for its code on the broker channel). Limits count from
    /// [`Prepared::execute`].
    fn prestart(&mut self) -> Result<(), BackendError>;
    /// Applies limits tighter than the ones it was built with (a warm
    /// sandbox serving a request that only tightens the pool's policy);
    /// refuses, changing nothing, what it cannot tighten any more.
    fn tighten(&mut self, limits: &airlock_policy::Limits) -> Result<(), BackendError>;
    /// Whether an idle sandbox is still whole (nothing died, nothing
    /// reported).
    fn is_alive(&self) -> bool;
    /// The host end of the broker channel (once).
    fn take_broker(&mut self) -> Option<UnixStream>;
    /// The host end of the egress channel (once): a SOCK_SEQPACKET socket
    /// on which each message carries one connection accepted inside.
    fn take_egress(&mut self) -> Option<OwnedFd>;
    /// What a crashed server must reap of this sandbox, as data for
    /// [`Backend::reap`] (stored with the execution while it runs).
    fn host_state(&self) -> serde_json::Value;
    /// Binds the job, runs it to the end and returns the result as soon
    /// as it is known, with the rest of the destruction left to the
    /// [`Teardown`].
    fn execute(self: Box<Self>, job: Job<'_>, hooks: Hooks<'_>) -> (RunResult, Teardown);
}

/// A source of identical prepared sandboxes for a pool: a python zygote
/// that forks them, a golden microVM snapshot they are restored from, or
/// plain cold preparation.
pub trait Template: Send + Sync + fmt::Debug {
    /// One more sandbox, isolated exactly as [`Backend::prepare`] would.
    fn spawn(&self) -> Result<Box<dyn Prepared>, BackendError>;
    /// Still usable: alive and not past its reuse bound (a template that
    /// says no is replaced).
    fn healthy(&self) -> bool;
    /// Whether spawning is much cheaper than a cold start (worth doing on
    /// demand when the pool is empty).
    fn is_fast(&self) -> bool;
    /// Sandboxes made from it so far.
    fn spawned(&self) -> u64;
}

/// What `airlock doctor` reports of a backend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    /// Backend name.
    pub backend: &'static str,
    /// Its level.
    pub isolation: IsolationLevel,
    /// What it runs on (a runtime's version), when installed.
    pub version: Option<String>,
    /// It ran a sandbox end to end here.
    pub works: bool,
    /// What went wrong and how to fix it, when it does not work.
    pub fix: Option<String>,
}

/// One isolation technology.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Its name in configuration, requests and results (`process`, `oci`,
    /// `gvisor`).
    fn name(&self) -> &'static str;
    /// The boundary it puts between the code and the host.
    fn level(&self) -> IsolationLevel;
    /// Checks a request against its policy and against what this backend
    /// enforces, starting nothing.
    fn validate(&self, req: &Request<'_>) -> Result<(), BackendError>;
    /// Builds one fully isolated sandbox.
    fn prepare(&self, spec: &Spec<'_>) -> Result<Box<dyn Prepared>, BackendError>;
    /// A template for a pool of sandboxes of `spec`, when this backend has
    /// one cheaper than preparing each sandbox cold (None: use
    /// [`cold_template`]). Called from a long-lived thread.
    fn template(&self, spec: &Spec<'_>) -> Result<Option<Arc<dyn Template>>, BackendError>;
    /// Destroys what a crashed server left of one sandbox (its
    /// [`Prepared::host_state`]); returns how many host objects it removed.
    /// The state is data read back from the store: never trusted to name
    /// anything but this backend's own objects.
    fn reap(&self, host_state: &serde_json::Value) -> usize;
    /// Destroys everything a previous server process (`previous_pid`) left
    /// that no record names; returns how many host objects it removed.
    fn reap_stale(&self, previous_pid: Option<u32>) -> usize;
    /// Runs a trivial sandbox end to end and reports (doctor).
    fn probe(&self) -> Probe;
    /// Whether its root has `language`'s runtime (an image may have only
    /// some): pools are kept only for those.
    fn runs(&self, language: airlock_policy::Language) -> bool {
        let _ = language;
        true
    }
    /// Whether it binds a session's workspace ([`Extras::workspace`]):
    /// the others refuse a spec that has one.
    fn sessions(&self) -> bool {
        false
    }
    /// The host ids a session's workspace on this backend is owned by,
    /// when they are not the sandbox user's (None): the microVM backend's
    /// file server runs as a uid of the session's own, held until `hold`
    /// is dropped (after the workspace is gone).
    fn session_owner(&self) -> Result<Option<SessionOwner>, BackendError> {
        Ok(None)
    }
}

/// The ids a session's workspace belongs to, and what reserves them for
/// that session alone while it is held.
#[derive(Debug)]
pub struct SessionOwner {
    /// Host uid and gid.
    pub ids: (u32, u32),
    /// Dropped once the workspace is unmounted, which releases the ids.
    pub hold: Box<dyn fmt::Debug + Send + Sync>,
}

/// Whether a probe's trivial sandbox (`exit 0`) ran, and what to say
/// when it did not.
pub(crate) fn verdict(ran: Result<RunResult, String>) -> (bool, Option<String>) {
    match ran {
        Ok(r) if r.exit_code == Some(0) => (true, None),
        Ok(r) => (
            false,
            Some(format!(
                "a trivial sandbox ended with {}{}",
                r.reason.as_str(),
                r.error.map(|e| format!(": {e}")).unwrap_or_default()
            )),
        ),
        Err(e) => (false, Some(e)),
    }
}

/// The backends one node offers, cheapest first.
#[derive(Debug, Clone)]
pub struct Backends {
    list: Vec<Arc<dyn Backend>>,
}

/// A request's isolation requirement: a minimum level, a backend by name,
/// or neither (the cheapest offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Want<'a> {
    /// The weakest level allowed (the policy's `isolation.minimum` and a
    /// request's own, whichever is stronger).
    pub minimum: Option<IsolationLevel>,
    /// One backend by name.
    pub backend: Option<&'a str>,
}

impl Backends {
    /// The offered set, in the order given; selection prefers the weakest
    /// level that meets a request, then the order given (the operator's
    /// preference among backends of one level).
    pub fn new(list: Vec<Arc<dyn Backend>>) -> Self {
        let mut list = list;
        list.sort_by_key(|b| b.level());
        Backends { list }
    }

    /// Every offered backend, cheapest first.
    pub fn all(&self) -> &[Arc<dyn Backend>] {
        &self.list
    }

    /// The backend named `name`, when offered.
    pub fn by_name(&self, name: &str) -> Option<&Arc<dyn Backend>> {
        self.list.iter().find(|b| b.name() == name)
    }

    /// `name (level)` of every offered backend.
    pub fn offered(&self) -> Vec<String> {
        self.list
            .iter()
            .map(|b| format!("{} ({})", b.name(), b.level()))
            .collect()
    }

    /// The backend that runs a request: the one it names, which must meet
    /// its minimum too, or else the cheapest that meets the minimum.
    pub fn select(&self, want: Want<'_>) -> Result<&Arc<dyn Backend>, BackendError> {
        let meets = |b: &&Arc<dyn Backend>| want.minimum.is_none_or(|m| b.level() >= m);
        let unavailable = |wanted: String| BackendError::Unavailable {
            wanted,
            offered: self.offered(),
        };
        match want.backend {
            Some(name) => {
                let b = self
                    .by_name(name)
                    .ok_or_else(|| unavailable(format!("backend {:?}", cut(name))))?;
                if meets(&b) {
                    Ok(b)
                } else {
                    Err(unavailable(format!(
                        "backend {name} ({}) at isolation {}",
                        b.level(),
                        want.minimum.map_or("", IsolationLevel::as_str)
                    )))
                }
            }
            None => self.list.iter().find(meets).ok_or_else(|| {
                unavailable(format!(
                    "isolation {}",
                    want.minimum.map_or("", IsolationLevel::as_str)
                ))
            }),
        }
    }
}

/// Where runtime state lives by default: /run/airlock as root, else
/// `$XDG_RUNTIME_DIR/airlock` (or a per-user directory under /tmp).
pub fn default_run_dir() -> std::path::PathBuf {
    let euid = airlock_sandbox::sys::geteuid();
    if euid == 0 {
        return "/run/airlock".into();
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| std::path::PathBuf::from(d).join("airlock"))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("airlock-{euid}")))
}

/// A backend installed here that could not be set up, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotHere {
    /// Backend name.
    pub name: &'static str,
    /// What went wrong.
    pub why: String,
}

/// Every backend this host can run: the process sandbox, and the OCI
/// runtime and gVisor when installed, their state under `run_dir`; `images`
/// gives the OCI and gVisor backends an image's root by backend name
/// instead of the host's runtime.
pub fn on_this_host(
    engine: Arc<airlock_sandbox::Engine>,
    run_dir: &std::path::Path,
    images: &std::collections::BTreeMap<String, airlock_sandbox::hosted::ImageRoot>,
    choice: &oci::Choice,
) -> (Vec<Arc<dyn Backend>>, Vec<NotHere>) {
    let mut list: Vec<Arc<dyn Backend>> =
        vec![Arc::new(process::ProcessBackend::new(engine.clone()))];
    let (runtimes, mut failed) = oci::installed(run_dir, choice);
    for rt in runtimes {
        let name = match rt.kind {
            oci::Kind::Gvisor => "gvisor",
            _ => "oci",
        };
        match oci::OciBackend::new(engine.clone(), rt) {
            Ok(b) => list.push(Arc::new(match images.get(name) {
                Some(image) => b.with_image(image.clone()),
                None => b,
            })),
            Err(e) => failed.push(NotHere {
                name,
                why: e.to_string(),
            }),
        }
    }
    (list, failed)
}

/// A template that prepares every sandbox cold through `backend`.
pub fn cold_template(backend: Arc<dyn Backend>, spec: &Spec<'_>) -> Arc<dyn Template> {
    Arc::new(Cold {
        backend,
        policy: spec.policy.clone(),
        language: spec.language,
        extras: spec.extras.clone(),
        spawned: AtomicU64::new(0),
    })
}

#[derive(Debug)]
struct Cold {
    backend: Arc<dyn Backend>,
    policy: Policy,
    language: Language,
    extras: Extras,
    spawned: AtomicU64,
}

impl Template for Cold {
    fn spawn(&self) -> Result<Box<dyn Prepared>, BackendError> {
        let sb = self.backend.prepare(&Spec {
            policy: &self.policy,
            language: self.language,
            extras: &self.extras,
        })?;
        self.spawned.fetch_add(1, Ordering::Relaxed);
        Ok(sb)
    }

    fn healthy(&self) -> bool {
        true
    }

    fn is_fast(&self) -> bool {
        false
    }

    fn spawned(&self) -> u64 {
        self.spawned.load(Ordering::Relaxed)
    }
}

/// A name echoed in an error, bounded.
fn cut(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The layers of `policy` a backend cannot enforce, checked against the
/// policy's choice: refused by default, named in the result under
/// `record_dangerous`. `missing` lists (layer, whether the policy uses it).
pub fn check_layers(
    backend: &'static str,
    policy: &Policy,
    missing: &[(&str, bool)],
) -> Result<Vec<String>, BackendError> {
    let used: Vec<String> = missing
        .iter()
        .filter(|(_, used)| *used)
        .map(|(l, _)| (*l).to_string())
        .collect();
    if used.is_empty() {
        return Ok(used);
    }
    match policy.isolation.missing_layers {
        MissingLayers::Refuse => Err(BackendError::Unsupported {
            backend,
            layers: used,
        }),
        MissingLayers::RecordDangerous => Ok(used),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake(&'static str, IsolationLevel);

    impl Backend for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn level(&self) -> IsolationLevel {
            self.1
        }
        fn validate(&self, _: &Request<'_>) -> Result<(), BackendError> {
            Ok(())
        }
        fn prepare(&self, _: &Spec<'_>) -> Result<Box<dyn Prepared>, BackendError> {
            Err(SandboxError::Control("not a real backend".into()).into())
        }
        fn template(&self, _: &Spec<'_>) -> Result<Option<Arc<dyn Template>>, BackendError> {
            Ok(None)
        }
        fn reap(&self, _: &serde_json::Value) -> usize {
            0
        }
        fn reap_stale(&self, _: Option<u32>) -> usize {
            0
        }
        fn probe(&self) -> Probe {
            Probe {
                backend: self.0,
                isolation: self.1,
                version: None,
                works: false,
                fix: None,
            }
        }
    }

    fn set() -> Backends {
        Backends::new(vec![
            Arc::new(Fake("gvisor", IsolationLevel::Gvisor)),
            Arc::new(Fake("process", IsolationLevel::Container)),
            Arc::new(Fake("oci", IsolationLevel::Container)),
        ])
    }

    #[test]
    fn the_cheapest_backend_meeting_the_minimum_runs() {
        let b = set();
        assert_eq!(
            b.select(Want::default()).map(|b| b.name()).ok(),
            Some("process")
        );
        let w = Want {
            minimum: Some(IsolationLevel::Container),
            backend: None,
        };
        assert_eq!(b.select(w).map(|b| b.name()).ok(), Some("process"));
        let w = Want {
            minimum: Some(IsolationLevel::Gvisor),
            backend: None,
        };
        assert_eq!(b.select(w).map(|b| b.name()).ok(), Some("gvisor"));
    }

    #[test]
    fn a_level_nobody_offers_is_refused_naming_what_is_offered() {
        let w = Want {
            minimum: Some(IsolationLevel::Microvm),
            backend: None,
        };
        match set().select(w) {
            Err(BackendError::Unavailable { wanted, offered }) => {
                assert_eq!(wanted, "isolation microvm");
                assert_eq!(
                    offered,
                    ["process (container)", "oci (container)", "gvisor (gvisor)"]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_named_backend_must_be_offered_and_meet_the_minimum() {
        let b = set();
        let w = Want {
            minimum: None,
            backend: Some("oci"),
        };
        assert_eq!(b.select(w).map(|b| b.name()).ok(), Some("oci"));
        let w = Want {
            minimum: None,
            backend: Some("firecracker"),
        };
        assert!(matches!(b.select(w), Err(BackendError::Unavailable { .. })));
        let w = Want {
            minimum: Some(IsolationLevel::Gvisor),
            backend: Some("oci"),
        };
        assert!(matches!(b.select(w), Err(BackendError::Unavailable { .. })));
    }

    #[test]
    fn a_missing_layer_refuses_unless_the_policy_accepts_the_danger() {
        let mut p = Policy::default();
        let missing = [("limits.cpus", true), ("filesystem.read_only_paths", false)];
        match check_layers("x", &p, &missing) {
            Err(BackendError::Unsupported { layers, .. }) => assert_eq!(layers, ["limits.cpus"]),
            other => panic!("{other:?}"),
        }
        p.isolation.missing_layers = MissingLayers::RecordDangerous;
        assert_eq!(
            check_layers("x", &p, &missing).ok(),
            Some(vec!["limits.cpus".to_string()])
        );
        assert_eq!(
            check_layers("x", &p, &[("limits.cpus", false)]).ok(),
            Some(Vec::new())
        );
    }
}
