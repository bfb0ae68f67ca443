//! Why the table refused a request.

use crate::{
    host::sockets::LocalSocket,
    model::mapping::{Binding, PortRange},
    model::spec::SpecError,
};

/// Why a request was refused. Nothing is changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("port is already allocated: '{spec}' overlaps '{existing}'")]
    Allocated { spec: String, existing: String },
    #[error("port is already allocated: {binding} is in use by a local socket ({socket})")]
    InUse { binding: Binding, socket: LocalSocket },
    #[error("no free host port left in {0}: every one is published or bound")]
    RangeFull(PortRange),
    #[error("no {count} free host port(s) in a row left in the dynamic range {pool}")]
    PoolExhausted { count: u32, pool: PortRange },
    #[error("no mapping '{0}'")]
    NotFound(String),
    #[error("no mapping '{spec}'; its host port is published as '{existing}'")]
    Mismatch { spec: String, existing: String },
    #[error("'{spec}' matches {count} mappings; name one by its host port: {candidates}")]
    Ambiguous {
        spec: String,
        count: usize,
        candidates: String,
    },
    #[error("no mapping publishes {0}: `update` replaces the backends of an existing mapping")]
    NoSuchBinding(String),
    #[error("`update` needs the mapping's host port(s): '{0}' has none")]
    UpdateNeedsPorts(String),
    #[error("{what} is full ({max}, limits.{limit})")]
    Full {
        what: &'static str,
        max: u32,
        limit: &'static str,
    },
    #[error(
        "the allow-list map is full ({max} prefixes in all lists together; mappings with the same \
         list share it): use fewer or shorter lists"
    )]
    AllowFull { max: u32 },
    #[error("kernel map update failed: {0:#}")]
    Datapath(anyhow::Error),
}
