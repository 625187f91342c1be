pub mod file_disk;
