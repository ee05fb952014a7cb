//! `airlock vm`: the microVM backend's store of guest artifacts (the
//! initramfs with airlock as the guest's init, the read-only root image of
//! the host's runtimes) and golden snapshots.

use std::process::ExitCode;

use serde_json::json;

/// `airlock vm …`
#[derive(clap::Args, Debug)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(clap::Subcommand, Debug)]
enum VmCommand {
    /// Build the guest's initramfs and read-only root image from this
    /// airlock binary and the host's runtimes (python3, node, sh, their
    /// libraries, the guest SDKs), or find them built: content-addressed
    /// and cached in the store (`AIRLOCK_VM_STORE`), as `airlock run` and
    /// a server with the default runtimes use them.
    BuildImage {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove what the current artifacts do not use: older initramfs and
    /// root images (an earlier airlock binary's, runtimes since changed)
    /// and golden snapshots made with them or with another kernel or QEMU.
    /// Run it when no server of another airlock version uses the store.
    Prune {
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
    },
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs one `airlock vm` command.
pub fn run(args: VmArgs) -> ExitCode {
    let backend = match crate::engine().map_err(|u| u.0).and_then(|e| {
        crate::microvm_backend(std::sync::Arc::new(e), &airlock_backend::default_run_dir())
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("airlock: the microvm backend cannot start here: {e}");
            return ExitCode::from(2);
        }
    };
    match args.command {
        VmCommand::BuildImage { json } => {
            let a = backend.artifacts();
            let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
            let (stale, stale_bytes) = backend.prune(true);
            if json {
                let v = json!({
                    "initrd": {"path": a.initrd, "bytes": size(&a.initrd)},
                    "root": {"id": a.root_id, "path": a.root, "bytes": size(&a.root)},
                    "accelerator": backend.accel().as_str(),
                    "stale": {"entries": stale, "bytes": stale_bytes},
                });
                println!("{v}");
            } else {
                println!(
                    "initramfs   {} ({})",
                    a.initrd.display(),
                    mib(size(&a.initrd))
                );
                println!(
                    "root image  {} {} ({})",
                    a.root_id,
                    a.root.display(),
                    mib(size(&a.root))
                );
                println!("accelerator {}", backend.accel().as_str());
                if stale > 0 {
                    println!(
                        "{stale} older artifacts or snapshots ({}): `airlock vm prune` removes them",
                        mib(stale_bytes)
                    );
                }
            }
            ExitCode::SUCCESS
        }
        VmCommand::Prune { dry_run } => {
            let (n, bytes) = backend.prune(dry_run);
            println!(
                "{} {n} artifacts or snapshots ({})",
                if dry_run { "would remove" } else { "removed" },
                mib(bytes)
            );
            ExitCode::SUCCESS
        }
    }
}
