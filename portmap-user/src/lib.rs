//! The `portmap` daemon and CLI, as a library so that tests can reuse the same code.
//!
//! Grouped by layer:
//! - `model`: what a mapping is and the table of them (pure: parsing, Maglev, planning).
//! - `config`: the configuration file, split by when a setting applies.
//! - `host`: what the daemon reads from the kernel besides its maps (addresses, local backends,
//!   sockets, netlink).
//! - `datapath`: the eBPF object, its maps and where its programs are attached.
//! - `daemon`: `portmap run` (the main loop, its state, the requests it serves).
//! - `api`: what the daemon speaks (control protocol, metrics, systemd notifications).
//! - `cli`: the `portmap` command line (clap definitions, printers, rates).
//! - `cni`: the `portmap-cni` plugin.

pub mod api;
pub mod cli;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod docker;
pub mod host;
pub mod model;
