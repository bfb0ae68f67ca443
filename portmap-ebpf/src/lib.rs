#![no_std]
// The programs live in the `portmap` binary target (src/main.rs); this empty library exists so
// that `portmap-user` can depend on the crate and be rebuilt when it changes (aya-build).
