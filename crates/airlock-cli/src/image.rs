//! `airlock image`: the store of OCI images the oci and gvisor backends
//! can run code in (see `airlock_backend::image`).

use std::path::PathBuf;
use std::process::ExitCode;

use airlock_backend::image::{ImportLimits, Store, default_store};

/// `airlock image …`
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ImageCommand {
    /// Import an OCI image layout (directory or tarball) or a `docker save`
    /// tarball: every digest verified, unpacked once, read-only.
    Import {
        /// The layout directory or tarball.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A name to refer to it by (e.g. python:3.12-slim).
        #[arg(long)]
        name: Option<String>,
        /// Largest unpacked size accepted, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 16 * 1024)]
        max_size: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List imported images.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a name, or an image by its id (with every name of it).
    Remove {
        /// A name, `sha256:<id>` or an id prefix of 12+ hex digits.
        reference: String,
    },
}

/// The store `airlock image` and `airlock run --image` use:
/// `AIRLOCK_IMAGE_STORE`, else the default.
pub fn store() -> Store {
    Store::new(
        std::env::var_os("AIRLOCK_IMAGE_STORE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(default_store),
    )
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("airlock: {msg}");
    ExitCode::from(2)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs one `airlock image` command.
pub fn run(args: ImageArgs) -> ExitCode {
    let store = store();
    match args.command {
        ImageCommand::Import {
            file,
            name,
            max_size,
            json,
        } => {
            let limits = ImportLimits {
                max_bytes: max_size.saturating_mul(1 << 20),
                ..ImportLimits::default()
            };
            match store.import(&file, name.as_deref(), limits) {
                Ok(i) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": i.record.id,
                                "name": i.name,
                                "already": i.already,
                                "layers": i.record.layers.len(),
                                "bytes": i.record.bytes,
                                "interpreters": i.record.interpreters,
                            })
                        );
                    } else {
                        println!(
                            "{} {}{} ({} layers, {}; {})",
                            if i.already {
                                "already imported"
                            } else {
                                "imported"
                            },
                            i.record.id,
                            i.name.map(|n| format!(" as {n}")).unwrap_or_default(),
                            i.record.layers.len(),
                            mib(i.record.bytes),
                            if i.record.interpreters.is_empty() {
                                "no python, node or sh".to_string()
                            } else {
                                i.record
                                    .interpreters
                                    .keys()
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("image import: {e}")),
            }
        }
        ImageCommand::List { json } => match store.list() {
            Ok(list) => {
                if json {
                    let v: Vec<_> = list
                        .iter()
                        .map(|(r, names)| {
                            serde_json::json!({
                                "id": r.id,
                                "names": names,
                                "layers": r.layers.len(),
                                "bytes": r.bytes,
                                "interpreters": r.interpreters,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    for (r, names) in list {
                        println!(
                            "{}  {:>10}  {}  {}",
                            &r.id[..19.min(r.id.len())],
                            mib(r.bytes),
                            r.interpreters.keys().cloned().collect::<Vec<_>>().join(","),
                            names.join(" ")
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ImageCommand::Remove { reference } => match store.remove(&reference) {
            Ok(Some(id)) => {
                println!("removed {id}");
                ExitCode::SUCCESS
            }
            Ok(None) => {
                println!("removed the name {reference} (the image has other names)");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}
