//! The `portmap` daemon and CLI, as a library so that tests can reuse the same code.

pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod local_backends;
pub mod maglev;
pub mod mapping;
pub mod metrics;
pub mod netlink;
pub mod notify;
pub mod rates;
pub mod sockets;
pub mod spec;
pub mod table;
