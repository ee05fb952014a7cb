//! The `airlock` binary: `run`, `serve`, `admin`, `doctor`, and (hidden)
//! the sandbox init.
//!
//! Owns: argument parsing, reading the user's files, mapping results to exit
//! codes. Must never: apply isolation itself (that is airlock-sandbox), or
//! print more than one line for a usage error.
//!
//! Exit codes: the program's own code; 128+N when it died of signal N; 2 for
//! bad input (nothing was started); 125 when the sandbox itself failed.

mod client;
mod doctor;
mod egress;
mod handler;
mod image;
mod mcp;
mod remote;
mod server;
mod vm;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use airlock_backend::{Backend, BackendError, Backends, CancelToken, Hooks, Job, Spec, Want};
use airlock_policy::IsolationLevel;
use airlock_policy::{Language, Policy};
use airlock_sandbox::{Engine, EngineConfig, Request, SandboxError, Stream, TerminationReason};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted code in a fresh, fully isolated sandbox"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one program in a fresh sandbox.
    Run(RunArgs),
    /// Serve the multi-tenant HTTP API.
    Serve(server::ServeArgs),
    /// Administer tenants, API keys and the audit log of a data directory.
    Admin(server::AdminArgs),
    /// Import, list and remove OCI images that the oci and gvisor
    /// backends can use as their root.
    Image(image::ImageArgs),
    /// Build the microVM guest's images, or prune the old ones.
    Vm(vm::VmArgs),
    /// Serve the sandbox tools to an agent over MCP on stdin and stdout,
    /// through a running `airlock serve` (key in AIRLOCK_API_KEY).
    Mcp(mcp::McpArgs),
    /// Report which isolation layers this host supports.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also report the warm pools of a running `airlock serve`
        /// (e.g. http://127.0.0.1:7070), read from its /metrics.
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// CA certificates (PEM) to verify an https:// server with.
        #[arg(long, value_name = "FILE", env = "AIRLOCK_CA", requires = "server")]
        ca: Option<PathBuf>,
    },
    /// Print a shell completion script (e.g. `airlock completions bash >
    /// /etc/bash_completion.d/airlock`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `airlock man | man -l -`.
    Man,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Language: python, javascript or shell (default: from the file extension).
    #[arg(long = "lang")]
    lang: Option<String>,
    /// Wall-clock limit in seconds (overrides the policy).
    #[arg(long, allow_negative_numbers = true)]
    timeout: Option<f64>,
    /// Memory limit in MiB (overrides the policy).
    #[arg(long)]
    memory: Option<u64>,
    /// Maximum number of tasks (overrides the policy).
    #[arg(long)]
    pids: Option<u64>,
    /// The weakest isolation the code may run behind: container, gvisor or
    /// microvm (the cheapest backend here that meets it runs the code).
    #[arg(long, value_name = "LEVEL", value_parser = parse_level)]
    isolation: Option<IsolationLevel>,
    /// Run on this backend: process, oci, gvisor or microvm (see `airlock
    /// doctor`).
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,
    /// Run in this imported image's root (`airlock image list`) instead
    /// of the host's runtime: on oci, or gvisor when asked for.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Policy file (TOML).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Print the result as JSON on stdout and nothing else.
    #[arg(long)]
    json: bool,
    /// Run on a running `airlock serve` (e.g. http://127.0.0.1:7070) with
    /// the API key in AIRLOCK_API_KEY: warm sandboxes, the broker, audit.
    #[arg(long, value_name = "URL", env = "AIRLOCK_SERVER")]
    server: Option<String>,
    /// CA certificates (PEM) to verify an https:// --server with (default:
    /// the system's).
    #[arg(long, value_name = "FILE", env = "AIRLOCK_CA")]
    ca: Option<PathBuf>,
    /// Run `handler(ax, input)` from the code with a local broker (logs on
    /// stderr, agent memory in AIRLOCK_LOCAL_DIR, secrets from --secret)
    /// and print its output as JSON.
    #[arg(long)]
    handler: bool,
    /// The handler's input: JSON, or @FILE.
    #[arg(long, value_name = "JSON", requires = "handler")]
    input: Option<String>,
    /// A secret the handler may read: NAME=@FILE, or NAME to take the
    /// environment variable NAME (repeatable; never stored).
    #[arg(long = "secret", value_name = "NAME", requires = "handler")]
    secrets: Vec<String>,
    /// Flow id scoping the handler's agent memory (default `default`).
    #[arg(long, value_name = "FLOW", requires = "handler")]
    flow: Option<String>,
    /// Code given inline.
    #[arg(short = 'c', value_name = "CODE", conflicts_with = "file")]
    code: Option<String>,
    /// File with the code.
    #[arg(value_name = "FILE", required_unless_present = "code")]
    file: Option<PathBuf>,
}

fn parse_level(s: &str) -> Result<IsolationLevel, String> {
    IsolationLevel::parse(s).map_err(|e| e.to_string())
}

/// A bad-input error: one line, exit 2.
struct Usage(String);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The sandbox init path: dispatched before anything else touches the process.
    if args.get(1).map(String::as_str) == Some(airlock_sandbox::launch::INIT_ARG) {
        airlock_sandbox::init::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(airlock_sandbox::agent::AGENT_ARG) {
        airlock_sandbox::agent::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(airlock_sandbox::zygote::ZYGOTE_ARG) {
        airlock_sandbox::zygote::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(airlock_sandbox::vminit::VMINIT_ARG) {
        airlock_sandbox::vminit::main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(airlock_backend::microvm::VMM_ARG) {
        airlock_backend::microvm::vmm_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(airlock_sandbox::kvm::KVM_PROBE_ARG) {
        return match airlock_sandbox::kvm::probe() {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(s) => {
                println!("{s}");
                ExitCode::from(1)
            }
        };
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first paragraph, on one line (a missing argument is
            // named on the line after the message).
            let text = e.to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = first.join(" ");
            let line = line.trim_start_matches("error: ");
            let line = if line.is_empty() {
                "invalid arguments"
            } else {
                line
            };
            eprintln!("airlock: {line} (see airlock --help)");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(code) => code,
            Err(Usage(msg)) => {
                eprintln!("airlock: {msg}");
                ExitCode::from(2)
            }
        },
        Command::Image(args) => image::run(args),
        Command::Vm(args) => vm::run(args),
        Command::Mcp(args) => mcp::run(args),
        Command::Doctor { json, server, ca } => doctor::run(json, server.as_deref(), ca.as_deref()),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "airlock", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            if clap_mangen::Man::new(cmd).render(&mut out).is_err() {
                return ExitCode::from(1);
            }
            let _ = std::io::stdout().write_all(&out);
            ExitCode::SUCCESS
        }
        Command::Serve(args) => server::serve(args, engine_config_base()),
        Command::Admin(args) => server::admin(args),
    }
}

/// The engine of `airlock run` and `doctor`: host settings from the
/// environment, including the operator's CA bundle (`AIRLOCK_CA_BUNDLE`).
fn engine() -> Result<Engine, Usage> {
    let mut cfg = engine_config_base();
    if let Some(p) = std::env::var_os("AIRLOCK_CA_BUNDLE") {
        cfg.extra_ca = Some(
            airlock_sandbox::rootfs::load_extra_ca(Path::new(&p))
                .map_err(|e| Usage(format!("AIRLOCK_CA_BUNDLE: {e}")))?,
        );
    }
    Ok(Engine::new(cfg))
}

/// The backends a local run may use: the process sandbox always, and the
/// OCI runtime and gVisor when they are installed (chosen only when asked
/// for: the process sandbox is the cheapest).
fn local_backends(
    image: Option<&str>,
    microvm: bool,
) -> Result<(Backends, Vec<airlock_backend::NotHere>), Usage> {
    let mut images = std::collections::BTreeMap::new();
    if let Some(reference) = image {
        let root = image::store()
            .root(reference)
            .map_err(|e| Usage(format!("--image: {e}")))?;
        images.insert("oci".to_string(), root.clone());
        images.insert("gvisor".to_string(), root);
    }
    let engine = Arc::new(engine()?);
    let run_dir = airlock_backend::default_run_dir();
    let (mut list, mut failed) =
        airlock_backend::on_this_host(engine.clone(), &run_dir, &images, &oci_choice());
    // The microVM backend builds its guest's artifacts on first use:
    // only when a run asks for it.
    if microvm {
        match microvm_backend(engine, &run_dir) {
            Ok(b) => list.push(b),
            Err(why) => failed.push(airlock_backend::NotHere {
                name: "microvm",
                why,
            }),
        }
    }
    // What an earlier run killed before its teardown left (a CLI has no
    // crash recovery of its own): only what no live engine owns, cgroups
    // (the process backend, first) before bundles.
    if airlock_sandbox::sys::geteuid() == 0 {
        for b in &list {
            b.reap_stale(None);
        }
    }
    if image.is_some() {
        // The process sandbox has no image root: never picked for one.
        list.retain(|b| b.name() != "process");
    }
    Ok((Backends::new(list), failed))
}

/// The backend that runs a local execution: the one `--backend` names, or
/// the cheapest here that meets the policy's minimum isolation.
fn local_backend(
    policy: &Policy,
    name: Option<&str>,
    image: Option<&str>,
) -> Result<Arc<dyn Backend>, Usage> {
    if image.is_some() && name == Some("process") {
        return Err(Usage(
            "--image runs on the oci or gvisor backend, not process".into(),
        ));
    }
    if image.is_some() && name == Some("microvm") {
        return Err(Usage(
            "--image runs on the oci or gvisor backend, not microvm".into(),
        ));
    }
    let microvm = name == Some("microvm")
        || (name.is_none() && policy.isolation.minimum == Some(IsolationLevel::Microvm));
    let (backends, failed) = local_backends(image, microvm)?;
    if let Some(f) = failed.iter().find(|f| Some(f.name) == name) {
        return Err(Usage(format!(
            "backend {} cannot start here: {}",
            f.name, f.why
        )));
    }
    backends
        .select(Want {
            minimum: policy.isolation.minimum,
            backend: name,
        })
        .cloned()
        .map_err(|e| {
            // Say why an installed backend that might have met it is not
            // among those offered.
            let mut line = e.to_string();
            for f in &failed {
                line.push_str(&format!("; {} cannot start here: {}", f.name, f.why));
            }
            Usage(line)
        })
}

/// The OCI runtime and gVisor as the environment names them
/// (`AIRLOCK_OCI_RUNTIME`: crun, runc or a path; `AIRLOCK_RUNSC`;
/// `AIRLOCK_GVISOR_PLATFORM`: systrap, ptrace or kvm), else as found here.
pub(crate) fn oci_choice() -> airlock_backend::oci::Choice {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    airlock_backend::oci::Choice {
        oci_runtime: var("AIRLOCK_OCI_RUNTIME").map(PathBuf::from),
        runsc: var("AIRLOCK_RUNSC").map(PathBuf::from),
        gvisor_platform: var("AIRLOCK_GVISOR_PLATFORM").map(|v| v.to_string_lossy().into_owned()),
    }
}

/// The microVM backend for a local run: QEMU and the guest kernel found
/// here (or named by `AIRLOCK_QEMU`, `AIRLOCK_VM_KERNEL`), KVM when it runs
/// a guest, otherwise QEMU's software emulation (the person running the CLI
/// is the operator; a line on stderr says so, and the result's
/// `enforced.accelerator` names it). `AIRLOCK_VM_ACCEL=kvm|tcg` forces one.
pub(crate) fn microvm_backend(
    engine: Arc<Engine>,
    run_dir: &Path,
) -> Result<Arc<airlock_backend::microvm::MicrovmBackend>, String> {
    use airlock_backend::microvm::{self, Accel, Settings};
    let accel = match std::env::var("AIRLOCK_VM_ACCEL").ok().as_deref() {
        None | Some("") => None,
        Some("kvm") => Some(Accel::Kvm),
        Some("tcg") => Some(Accel::Tcg),
        Some(other) => return Err(format!("AIRLOCK_VM_ACCEL={other:?}: expected kvm or tcg")),
    };
    let settings = Settings {
        qemu: std::env::var_os("AIRLOCK_QEMU").map(PathBuf::from),
        kernel: std::env::var_os("AIRLOCK_VM_KERNEL").map(PathBuf::from),
        accel,
        allow_tcg: true,
        store: None,
    };
    let b = microvm::backend(engine, &settings, run_dir)?;
    if b.accel() == Accel::Tcg && accel.is_none() {
        eprintln!(
            "airlock: no working KVM here; the microVM runs under QEMU's software emulation \
             (TCG: slow, for development and tests)"
        );
    }
    Ok(b)
}

fn engine_config_base() -> EngineConfig {
    let mut cfg = match EngineConfig::from_current_exe() {
        Ok(c) => c,
        Err(_) => EngineConfig {
            init_path: PathBuf::from("/proc/self/exe"),
            interpreters: Default::default(),
            root_host_ids: (65534, 65534),
            use_cgroups: true,
            extra_ca: None,
        },
    };
    for (lang, var) in [
        (Language::Python, "AIRLOCK_PYTHON"),
        (Language::Javascript, "AIRLOCK_NODE"),
        (Language::Shell, "AIRLOCK_SH"),
    ] {
        if let Some(p) = std::env::var_os(var) {
            cfg.interpreters.insert(lang, PathBuf::from(p));
        }
    }
    cfg
}

fn load_policy(args: &RunArgs) -> Result<Policy, Usage> {
    let mut policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Usage(format!(
                    "cannot read policy file {}: {}",
                    path.display(),
                    short_io(&e)
                ))
            })?;
            Policy::from_toml(&text).map_err(|e| Usage(format!("{}: {e}", path.display())))?
        }
        None => Policy::default(),
    };
    if let Some(t) = args.timeout {
        if !(t.is_finite()
            && t > 0.0
            && t * 1000.0 <= airlock_policy::ceilings::WALL_TIME_MS as f64)
        {
            return Err(Usage(format!(
                "--timeout {t}: expected seconds in (0, 86400]"
            )));
        }
        policy.limits.wall_time_ms = ((t * 1000.0).ceil() as u64).max(1);
    }
    if let Some(m) = args.memory {
        policy.limits.memory_mib = m;
    }
    if let Some(p) = args.pids {
        policy.limits.pids = p;
    }
    policy.isolation.require(args.isolation);
    policy.validate().map_err(|e| Usage(e.to_string()))?;
    Ok(policy)
}

fn short_io(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

fn run(args: RunArgs) -> Result<ExitCode, Usage> {
    let policy = load_policy(&args)?;
    let (code, file_name): (Vec<u8>, Option<String>) = match (&args.code, &args.file) {
        (Some(c), _) => (c.clone().into_bytes(), None),
        (None, Some(path)) => (
            read_code(path, policy.limits.code_bytes)?,
            path.file_name().and_then(|n| n.to_str()).map(String::from),
        ),
        (None, None) => return Err(Usage("give a FILE or -c CODE".into())),
    };
    let language = match &args.lang {
        Some(l) => Language::parse(l).map_err(|e| Usage(e.to_string()))?,
        None => match file_name.as_deref().and_then(Language::from_file_name) {
            Some(l) => l,
            None => {
                return Err(Usage(
                    "cannot tell the language; pass --lang python|javascript|shell".into(),
                ));
            }
        },
    };
    if args.handler {
        if args.server.is_some() {
            return Err(Usage(
                "--handler runs locally; through a server use the API's \"handler\": true".into(),
            ));
        }
        let input = match args.input.as_deref() {
            None => serde_json::Value::Null,
            Some(text) => {
                let text = match text.strip_prefix('@') {
                    Some(p) => std::fs::read_to_string(p).map_err(|e| {
                        Usage(format!("--input: cannot read {p}: {}", short_io(&e)))
                    })?,
                    None => text.to_string(),
                };
                serde_json::from_str(&text)
                    .map_err(|e| Usage(format!("--input is not JSON: {e}")))?
            }
        };
        let mut secrets = airlock_broker::GivenSecrets::default();
        for s in &args.secrets {
            let (name, value) = handler::parse_secret(s)?;
            secrets.0.insert(name, value);
        }
        let backend = local_backend(&policy, args.backend.as_deref(), args.image.as_deref())?;
        return handler::run(
            backend.as_ref(),
            handler::HandlerRun {
                language,
                code: &code,
                file_name: file_name.as_deref(),
                policy: &policy,
                input,
                secrets,
                flow: args.flow.clone().unwrap_or_else(|| "default".into()),
                json: args.json,
            },
        );
    }
    let stdin = read_stdin(policy.limits.stdin_bytes)?;
    if let Some(url) = &args.server {
        if args.policy.is_some() {
            return Err(Usage(
                "--policy applies to local runs; with --server the server's policy governs".into(),
            ));
        }
        if args.image.is_some() {
            return Err(Usage(
                "--image applies to local runs; a server's images are its operator's \
                 [backends] images"
                    .into(),
            ));
        }
        let mut limits = serde_json::Map::new();
        if args.timeout.is_some() {
            limits.insert("wall_time_ms".into(), policy.limits.wall_time_ms.into());
        }
        if let Some(m) = args.memory {
            limits.insert("memory_mib".into(), m.into());
        }
        if let Some(p) = args.pids {
            limits.insert("pids".into(), p.into());
        }
        return remote::run(remote::Remote {
            url,
            language: language.as_str(),
            code: &code,
            stdin: &stdin,
            limits,
            isolation: args.isolation.map(IsolationLevel::as_str),
            backend: args.backend.as_deref(),
            json: args.json,
            ca: args.ca.as_deref(),
        });
    }
    let backend = local_backend(&policy, args.backend.as_deref(), args.image.as_deref())?;
    let req = Request {
        language,
        code: &code,
        file_name: file_name.as_deref(),
        stdin: &stdin,
        policy: &policy,
    };

    let json = args.json;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut pass = |s: Stream, data: &[u8]| {
        if json {
            return;
        }
        let _ = match s {
            Stream::Stdout => out.write_all(data).and_then(|_| out.flush()),
            Stream::Stderr => err.write_all(data),
        };
    };
    if let Err(e) = backend.validate(&req) {
        return usage_or_125(e);
    }
    let rules = policy.network.rules().map_err(|e| Usage(e.to_string()))?;
    let extras = airlock_sandbox::Extras {
        egress: policy.network.is_proxy(),
        ..Default::default()
    };
    let mut sandbox = match backend.prepare(&Spec {
        policy: &policy,
        language,
        extras: &extras,
    }) {
        Ok(sb) => sb,
        Err(e) => return usage_or_125(e),
    };
    let proxy = match sandbox.take_egress() {
        Some(ch) => Some(egress::LocalProxy::start(ch, rules, json).map_err(Usage)?),
        None => None,
    };
    let (result, teardown) = sandbox.execute(
        Job {
            code: &code,
            file_name: file_name.as_deref(),
            stdin: &stdin,
        },
        Hooks {
            on_output: &mut pass,
            on_start: &mut || {},
            cancel: &CancelToken::new(),
        },
    );
    drop(teardown);
    let decisions = proxy.map(egress::LocalProxy::finish);
    if json {
        let mut doc = serde_json::to_value(&result).unwrap_or_default();
        if let (Some(d), Some(obj)) = (&decisions, doc.as_object_mut()) {
            obj.insert("egress".into(), serde_json::to_value(d).unwrap_or_default());
        }
        let text = serde_json::to_string(&doc).unwrap_or_else(|_| "{}".into());
        println!("{text}");
        return Ok(if result.reason == TerminationReason::InternalError {
            ExitCode::from(125)
        } else {
            ExitCode::SUCCESS
        });
    }
    if result.reason == TerminationReason::InternalError {
        eprintln!(
            "airlock: sandbox failed: {}",
            result.error.as_deref().unwrap_or("internal error")
        );
        return Ok(ExitCode::from(125));
    }
    let line = limit_line(&result, &policy);
    if let Some(line) = line {
        eprintln!("airlock: {}: {line}", result.reason.as_str());
    }
    let code = match (result.exit_code, result.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 125,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// A backend error of a local run: bad input exits 2 with its line, a
/// sandbox that failed 125.
fn usage_or_125(e: BackendError) -> Result<ExitCode, Usage> {
    match e {
        BackendError::Sandbox(
            SandboxError::InvalidRequest(_) | SandboxError::RuntimeMissing(_),
        )
        | BackendError::Unsupported { .. }
        | BackendError::Unavailable { .. } => Err(Usage(e.to_string())),
        e => {
            eprintln!("airlock: sandbox failed: {e}");
            Ok(ExitCode::from(125))
        }
    }
}

/// The one line that names the limit that ended a run (none when the
/// program ended by itself, or the sandbox failed).
fn limit_line(result: &airlock_sandbox::RunResult, policy: &Policy) -> Option<String> {
    let l = &policy.limits;
    match result.reason {
        TerminationReason::Exited | TerminationReason::InternalError => None,
        TerminationReason::Timeout => {
            Some(format!("wall-clock limit of {} ms reached", l.wall_time_ms))
        }
        TerminationReason::CpuLimit => {
            Some(format!("CPU-time limit of {} ms reached", l.cpu_time_ms))
        }
        TerminationReason::MemoryLimit => {
            Some(format!("memory limit of {} MiB reached", l.memory_mib))
        }
        TerminationReason::PidsLimit => Some(format!("task limit of {} reached", l.pids)),
        TerminationReason::OutputLimit => {
            Some("output limit reached; output truncated".to_string())
        }
        TerminationReason::DiskLimit => Some(format!(
            "scratch space limit of {} MiB / {} inodes reached",
            policy.filesystem.scratch_mib, policy.filesystem.scratch_inodes
        )),
        TerminationReason::PolicyViolation => {
            Some("killed for a forbidden system call (seccomp)".into())
        }
        TerminationReason::Cancelled
        | TerminationReason::ServerShutdown
        | TerminationReason::ServerRestart
        | TerminationReason::NodeLost => Some("stopped before the program ended".into()),
    }
}

fn read_code(path: &Path, cap: u64) -> Result<Vec<u8>, Usage> {
    let shown = path.display();
    let f = std::fs::File::open(path)
        .map_err(|e| Usage(format!("cannot read {shown}: {}", short_io(&e))))?;
    let meta = f
        .metadata()
        .map_err(|e| Usage(format!("cannot read {shown}: {}", short_io(&e))))?;
    if !meta.is_file() {
        return Err(Usage(format!("{shown} is not a regular file")));
    }
    let mut buf = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Usage(format!("cannot read {shown}: {}", short_io(&e))))?;
    if buf.len() as u64 > cap {
        return Err(Usage(format!(
            "{shown} is larger than the code limit of {cap} bytes (limits.code_bytes)"
        )));
    }
    Ok(buf)
}

fn read_stdin(cap: u64) -> Result<Vec<u8>, Usage> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    if stdin.lock().take(cap + 1).read_to_end(&mut buf).is_err() {
        return Ok(Vec::new());
    }
    if buf.len() as u64 > cap {
        return Err(Usage(format!(
            "stdin is larger than the limit of {cap} bytes (limits.stdin_bytes)"
        )));
    }
    Ok(buf)
}
