//! What a mapping is and the table of them, without the kernel: parsing Docker's `-p` grammar
//! (`spec`), the mapping type (`mapping`), source allow-lists (`allow`), Maglev tables
//! (`maglev`) and the all-or-nothing table the daemon applies changes through (`table`, which
//! reaches the maps through a trait).

pub mod allow;
pub mod maglev;
pub mod mapping;
pub mod prefixes;
pub mod spec;
pub mod table;
