//! Writes the man pages of `portmap` (and one per subcommand) and `portmap-cni` into the
//! directory given as the only argument, from the same clap definitions the binaries parse with
//! (`cargo xtask man` runs it).

use clap::CommandFactory as _;

fn main() -> anyhow::Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("usage: man OUT_DIR"))?;
    std::fs::create_dir_all(&out)?;
    clap_mangen::generate_to(portmap::cli::Cli::command(), &out)?;
    clap_mangen::generate_to(portmap::cni::install::Cli::command(), &out)?;
    for entry in std::fs::read_dir(&out)? {
        println!("{}", entry?.path().display());
    }
    Ok(())
}
