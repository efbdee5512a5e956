//! Rebuild when a migration is added or changed: `sqlx::migrate!` embeds
//! the migrations directory, which cargo does not watch on its own.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
