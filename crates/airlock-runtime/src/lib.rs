//! airlock-runtime: the orchestration between the API and the backends.
//!
//! Owns: admission (bounded concurrency and queue, per-tenant shares, fair
//! dispatch), the worker threads that own sandboxes, warm pools per
//! (backend, language), the lifecycle of one execution as named steps
//! (sandbox, broker session, egress proxy, live output, redacted result,
//! record, audit), cancellation and drain, and crash recovery. It talks to
//! backends only through `airlock-backend`'s traits.
//!
//! Must never: know which backend runs (it reads only the result's
//! `enforced`); run a sandbox from a short-lived thread (a sandbox dies
//! with the thread that spawned it); let anything act for an execution
//! once its record is final; speak HTTP (that is `airlock-server`).

mod egress;
pub mod exec;
mod lifecycle;
pub mod live;
pub mod metrics;
pub mod pool;
pub mod recover;
pub mod session;

pub use exec::{
    Deps, Entry, Executor, Full, RecordRenderer, Slot, Stopped, Submission, TenantShare,
};
pub use pool::{GUEST_MOUNT, PoolSpec};
pub use recover::recover;
