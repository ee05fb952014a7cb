//! `airlock doctor`: which isolation layers this host supports, and how to
//! fix each missing one. Every check is a real probe, not a guess from
//! version numbers where a probe is possible.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use airlock_policy::{Language, Policy};
use airlock_sandbox::{Request, cgroup, sys};
use serde::Serialize;

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

/// How much a check matters, and for what: `required` checks failing make
/// doctor exit 1 (that backend cannot run); `recommended` and `optional`
/// ones only say what is lost.
fn role(name: &str) -> (&'static str, &'static str) {
    match name {
        "user_namespaces" | "landlock" | "seccomp" | "sandbox_end_to_end" => {
            ("required", "the process sandbox (every execution)")
        }
        "cgroups" => (
            "recommended",
            "cgroup memory, pids and CPU limits (without: rlimits, no CPU quota)",
        ),
        "ca_bundle" => ("recommended", "verified TLS through egress"),
        "runtime_python" => ("optional", "python executions"),
        "runtime_javascript" => ("optional", "JavaScript executions"),
        "runtime_shell" => ("optional", "shell executions"),
        "python_zygote" => ("optional", "warm python sandboxes forked from a zygote"),
        "backend_oci" => ("optional", "the oci backend (an OCI runtime: crun or runc)"),
        "backend_gvisor" => ("optional", "the gvisor backend (gVisor's runsc)"),
        "qemu_system_x86_64" | "backend_microvm" => (
            "optional",
            "the microvm backend (QEMU microvm, its own guest kernel)",
        ),
        "kvm" => (
            "optional",
            "microVMs under hardware virtualisation (without: TCG emulation, development only)",
        ),
        _ => ("optional", "a running server's warm pools"),
    }
}

/// A backend's probe as a check: ok when it ran a sandbox end to end.
fn probed(b: &dyn airlock_backend::Backend) -> (bool, String) {
    let p = b.probe();
    let version = p.version.unwrap_or_else(|| "unknown version".into());
    match p.fix {
        None if p.works => (
            true,
            format!(
                "{version}: ran a sandbox end to end (isolation {})",
                p.isolation
            ),
        ),
        fix => (false, format!("{version}: {}", fix.unwrap_or_default())),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    name: &'static str,
    ok: bool,
    role: &'static str,
    needed_for: &'static str,
    detail: &'a str,
    fix: Option<&'a str>,
}

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn which(bin: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| format!("{d}/{bin}"))
        .find(|p| Path::new(p).is_file())
}

fn version_of(bin: &str, arg: &str) -> Option<String> {
    let out = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// Pool lines of a running server's /metrics (`url`: http:// or https://,
/// verified with `ca` or the system's CAs).
fn pool_state(url: &str, ca: Option<&Path>) -> Result<String, String> {
    let t = crate::client::target(url)?;
    let mut conn = crate::client::connect(&t, ca, std::time::Duration::from_secs(5))?;
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.authority
    );
    let raw = crate::client::exchange(conn.as_mut(), req.as_bytes(), 1 << 20)
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&raw).into_owned();
    let pools: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("airlock_pool_") && !l.contains("_bucket") && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("airlock_pool_").to_string())
        .collect();
    if pools.is_empty() {
        return Err("no pool metrics (is it an airlock server?)".into());
    }
    Ok(pools.join(", "))
}

pub fn run(json: bool, server: Option<&str>, ca: Option<&Path>) -> ExitCode {
    let mut checks = Vec::new();

    let max_userns = read("/proc/sys/user/max_user_namespaces")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let unpriv = read("/proc/sys/kernel/unprivileged_userns_clone")
        .map(|v| v == "1")
        .unwrap_or(true);
    let apparmor = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
        .map(|v| v == "0")
        .unwrap_or(true);
    checks.push(Check {
        name: "user_namespaces",
        ok: max_userns > 0 && (sys::geteuid() == 0 || (unpriv && apparmor)),
        detail: format!("max_user_namespaces={max_userns}, unprivileged_userns_clone={unpriv}, apparmor unrestricted={apparmor}"),
        fix: Some("sysctl -w user.max_user_namespaces=15000 kernel.unprivileged_userns_clone=1 kernel.apparmor_restrict_unprivileged_userns=0".into()),
    });

    let abi = sys::landlock_abi();
    let pinned = airlock_sandbox::init::LANDLOCK_ABI_NUM;
    checks.push(Check {
        name: "landlock",
        ok: abi >= pinned,
        detail: format!("kernel ABI {abi}, airlock pins ABI {pinned} (strict mode requires it)"),
        fix: Some(if abi == 0 {
            "enable CONFIG_SECURITY_LANDLOCK and add landlock to the lsm= kernel parameter".into()
        } else {
            "upgrade to Linux 6.10+ or set isolation.landlock = \"best_effort_dangerous\" (development only)".into()
        }),
    });

    let seccomp = read("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    checks.push(Check {
        name: "seccomp",
        ok: ["kill_process", "errno"]
            .iter()
            .all(|a| seccomp.split_whitespace().any(|x| x == *a)),
        detail: format!("actions: {seccomp}"),
        fix: Some("enable CONFIG_SECCOMP_FILTER".into()),
    });

    match cgroup::detect() {
        Some(layout) => {
            let version = match layout {
                cgroup::Layout::V1 { .. } => "v1",
                cgroup::Layout::V2 { .. } => "v2",
            };
            let created = cgroup::probe_create(&layout);
            checks.push(Check {
                name: "cgroups",
                ok: created.is_ok(),
                detail: match &created {
                    Ok(()) => format!("{version}: a sandbox cgroup can be created"),
                    Err(e) => format!("{version}: cannot create a sandbox cgroup ({e}); rlimits are used instead"),
                },
                fix: Some("run as root, or delegate a cgroup v2 subtree to this user (systemd Delegate=yes)".into()),
            });
        }
        None => checks.push(Check {
            name: "cgroups",
            ok: false,
            detail: "no cgroup v2 with memory+pids and no v1 memory+pids hierarchy".into(),
            fix: Some("mount cgroup2 with the memory, pids and cpu controllers enabled".into()),
        }),
    }

    let engine = match crate::engine() {
        Ok(e) => {
            let bundle = Path::new(airlock_sandbox::rootfs::CA_BUNDLE_PATH).is_file();
            checks.push(Check {
                name: "ca_bundle",
                ok: bundle || std::env::var_os("AIRLOCK_CA_BUNDLE").is_some(),
                detail: match (bundle, std::env::var_os("AIRLOCK_CA_BUNDLE")) {
                    (_, Some(p)) => format!(
                        "the host's bundle{} plus {} (AIRLOCK_CA_BUNDLE)",
                        if bundle { "" } else { " (none)" },
                        Path::new(&p).display()
                    ),
                    (true, None) => format!(
                        "sandboxes get {} read-only",
                        airlock_sandbox::rootfs::CA_BUNDLE_PATH
                    ),
                    (false, None) => {
                        "the host has no CA bundle: TLS through egress cannot verify servers".into()
                    }
                },
                fix: (!bundle).then(|| "install ca-certificates".into()),
            });
            e
        }
        Err(crate::Usage(why)) => {
            checks.push(Check {
                name: "ca_bundle",
                ok: false,
                detail: why,
                fix: Some("point AIRLOCK_CA_BUNDLE at a PEM file of CA certificates".into()),
            });
            airlock_sandbox::Engine::new(crate::engine_config_base())
        }
    };
    for lang in Language::ALL {
        let rt = engine.runtime(lang);
        checks.push(Check {
            name: match lang {
                Language::Python => "runtime_python",
                Language::Javascript => "runtime_javascript",
                Language::Shell => "runtime_shell",
            },
            ok: rt.is_ok(),
            detail: rt
                .as_ref()
                .map(|r| r.interpreter.clone())
                .unwrap_or_else(|e| e.to_string()),
            fix: Some(match lang {
                Language::Python => "apt install python3 (or set AIRLOCK_PYTHON)".into(),
                Language::Javascript => "apt install nodejs (or set AIRLOCK_NODE)".into(),
                Language::Shell => "apt install dash (or set AIRLOCK_SH)".into(),
            }),
        });
    }

    // End to end: a real sandbox with every layer.
    let policy = Policy::default();
    let req = Request {
        language: Language::Shell,
        code: b"exit 0",
        file_name: None,
        stdin: b"",
        policy: &policy,
    };
    let e2e = engine.run(&req, &mut |_, _| {});
    checks.push(Check {
        name: "sandbox_end_to_end",
        ok: e2e.as_ref().is_ok_and(|r| r.exit_code == Some(0)),
        detail: match &e2e {
            Ok(r) => format!(
                "ok: setup {:.1} ms, run {:.1} ms, landlock ABI {}, cgroup {:?}",
                r.setup_time_ms, r.wall_time_ms, r.enforced.landlock.abi, r.enforced.cgroup
            ),
            Err(e) => e.to_string(),
        },
        fix: Some("see the failing layer above".into()),
    });

    // The other backends: installed, version, and a trivial sandbox run
    // end to end through each (not only a binary found).
    let engine = std::sync::Arc::new(engine);
    let (backends, failed) = airlock_backend::on_this_host(
        engine.clone(),
        &airlock_backend::default_run_dir(),
        &Default::default(),
        &crate::oci_choice(),
    );
    for (name, fix) in [
        (
            "backend_oci",
            "apt install crun runc (runc where crun refuses a hybrid cgroup layout)",
        ),
        (
            "backend_gvisor",
            "apt install -t bookworm-backports runsc (the 2024 build: platform systrap)",
        ),
    ] {
        let short = name.trim_start_matches("backend_");
        let (ok, detail) = match (
            backends.iter().find(|b| b.name() == short),
            failed.iter().find(|f| f.name == short),
        ) {
            (_, Some(f)) => (false, format!("cannot start here: {}", f.why)),
            (Some(b), None) => probed(b.as_ref()),
            (None, None) => (false, "not installed".into()),
        };
        checks.push(Check {
            name,
            ok,
            detail,
            fix: Some(fix.into()),
        });
    }
    let zygote = engine
        .runtime(airlock_policy::Language::Python)
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            airlock_sandbox::zygote::libpython_of(&rt.interpreter).map_err(|e| e.to_string())
        });
    checks.push(Check {
        name: "python_zygote",
        ok: zygote.is_ok(),
        detail: match zygote {
            Ok((lib, version)) => {
                format!("python {version}, {lib}: warm python sandboxes fork from a zygote")
            }
            Err(e) => format!("{e}; warm python sandboxes start cold"),
        },
        fix: Some("apt install libpython3.11 (the shared library of the host's python3)".into()),
    });
    let qemu = which("qemu-system-x86_64");
    checks.push(Check {
        name: "qemu_system_x86_64",
        ok: qemu.is_some(),
        detail: qemu
            .as_ref()
            .and_then(|p| version_of(p, "--version"))
            .unwrap_or_else(|| "not installed".into()),
        fix: Some("apt install qemu-system-x86".into()),
    });
    // The microVM backend: QEMU, the kernel, the accelerator and the guest's
    // artifacts (built now when missing); one sandbox run end to end in a
    // guest only when asked (`AIRLOCK_DOCTOR_MICROVM=1`): under software
    // emulation a boot takes seconds of a core.
    let mut vm_on_tcg = false;
    let (ok, detail) =
        match crate::microvm_backend(engine.clone(), &airlock_backend::default_run_dir()) {
            Err(why) => (false, format!("cannot start here: {why}")),
            Ok(b) => {
                vm_on_tcg = b.accel() == airlock_backend::microvm::Accel::Tcg;
                if std::env::var_os("AIRLOCK_DOCTOR_MICROVM").is_some_and(|v| v == "1") {
                    probed(b.as_ref())
                } else {
                    (
                        true,
                        format!(
                            "{}: ready (set AIRLOCK_DOCTOR_MICROVM=1 to boot a guest end to end)",
                            b.describe()
                        ),
                    )
                }
            }
        };
    checks.push(Check {
        name: "backend_microvm",
        ok,
        detail,
        fix: Some(
            "apt install -t bookworm-backports qemu-system-x86 linux-image-cloud-amd64; \
             apt install erofs-utils"
                .into(),
        ),
    });
    let kvm = crate::doctor::kvm_probe();
    // Some nested or paravirtual KVM devices run the probe's few
    // instructions but not a guest kernel: the microVM backend found so.
    let kvm = match kvm {
        Ok(s) if vm_on_tcg && std::env::var_os("AIRLOCK_VM_ACCEL").is_none() => Err(format!(
            "{s}, but a guest kernel does not boot on this KVM device; microVMs run under TCG"
        )),
        other => other,
    };
    checks.push(Check {
        name: "kvm",
        ok: kvm.is_ok(),
        detail: match &kvm {
            Ok(s) => s.clone(),
            Err(s) => s.clone(),
        },
        fix: Some("enable virtualisation (VT-x/AMD-V, or nested virtualisation on a cloud VM) and load kvm_intel/kvm_amd".into()),
    });

    if let Some(url) = server {
        let state = pool_state(url, ca);
        checks.push(Check {
            name: "warm_pools",
            ok: state.is_ok(),
            detail: match state {
                Ok(s) | Err(s) => s,
            },
            fix: Some(
                "start `airlock serve` (pools: [pool] python/javascript in its config)".into(),
            ),
        });
    }

    let reports: Vec<Report<'_>> = checks
        .iter()
        .map(|c| {
            let (role, needed_for) = role(c.name);
            Report {
                name: c.name,
                ok: c.ok,
                role,
                needed_for,
                detail: &c.detail,
                fix: c.fix.as_deref(),
            }
        })
        .collect();
    let missing: Vec<&str> = reports
        .iter()
        .filter(|r| r.role == "required" && !r.ok)
        .map(|r| r.name)
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
    } else {
        for r in &reports {
            println!(
                "{} {:<20} {}",
                if r.ok { "ok  " } else { "MISS" },
                r.name,
                r.detail
            );
            if !r.ok {
                println!("     {:<24} {}: {}", "", r.role, r.needed_for);
                if let Some(f) = r.fix {
                    println!("     {:<24} fix: {f}", "");
                }
            }
        }
        if missing.is_empty() {
            println!("the process sandbox has every required layer");
        } else {
            println!(
                "the process sandbox cannot run: missing {}",
                missing.join(", ")
            );
        }
    }
    if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs a minimal real-mode guest (`out` one byte, `hlt`) on /dev/kvm in a
/// child process, so a crashing or hanging KVM cannot take doctor down.
fn kvm_probe() -> Result<String, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new("timeout")
        .arg("10")
        .arg(exe)
        .arg(airlock_sandbox::kvm::KVM_PROBE_ARG)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the KVM probe: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(if text.is_empty() {
            format!("KVM probe failed ({})", out.status)
        } else {
            text
        })
    }
}
