//! Local test images: no registry is reachable from CI, so tests build a tiny image
//! `FROM scratch` with the host's statically linked busybox (Debian's `busybox-static`) and
//! its applets (`sh`, `echo`, `sleep`, ...) as symlinks in `/bin`.

use std::path::Path;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::BuildImageOptions;
use futures::StreamExt;

use super::ExecError;

/// Where Debian's `busybox-static` puts the binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// One build at a time in this process: tests that start together would otherwise each build
/// the image, and every build but the last would leave a dangling one.
static BUILDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Builds image `tag` from [`HOST_BUSYBOX`] unless the engine has it already.
pub async fn ensure_busybox_image(docker: &Docker, tag: &str) -> Result<(), ExecError> {
    let _building = BUILDING.lock().await;
    match docker.inspect_image(tag).await {
        Ok(_) => return Ok(()),
        Err(DockerError::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => return Err(ExecError::docker(format!("inspect image {tag}"), e)),
    }
    let context = busybox_context(Path::new(HOST_BUSYBOX)).await?;
    let options = BuildImageOptions {
        t: Some(tag.to_owned()),
        rm: true,
        forcerm: true,
        ..Default::default()
    };
    let mut build = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    while let Some(step) = build.next().await {
        step.map_err(|e| ExecError::docker(format!("build image {tag}"), e))?;
    }
    Ok(())
}

/// The build context: a Dockerfile and `rootfs/` with `bin/busybox`, one symlink per applet
/// (what `busybox --install -s /bin` would make; `RUN` is impossible without a shell to start
/// from) and a world-writable `tmp/`.
async fn busybox_context(busybox: &Path) -> Result<Vec<u8>, ExecError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        ExecError::InvalidSpec(format!(
            "{what} {} (install busybox-static): {e}",
            busybox.display()
        ))
    };
    let binary = tokio::fs::read(busybox)
        .await
        .map_err(|e| invalid("read", &e))?;
    let listed = tokio::process::Command::new(busybox)
        .arg("--list")
        .output()
        .await
        .map_err(|e| invalid("run", &e))?;
    if !listed.status.success() {
        return Err(invalid("list the applets of", &listed.status));
    }
    let applets = String::from_utf8_lossy(&listed.stdout).into_owned();

    let build = || -> std::io::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let dockerfile = b"FROM scratch\nCOPY rootfs/ /\n";
        let mut header = file_header(dockerfile.len() as u64, 0o644);
        tar.append_data(&mut header, "Dockerfile", dockerfile.as_slice())?;
        for dir in ["rootfs/", "rootfs/bin/"] {
            let mut header = dir_header(0o755);
            tar.append_data(&mut header, dir, std::io::empty())?;
        }
        let mut header = dir_header(0o1777);
        tar.append_data(&mut header, "rootfs/tmp/", std::io::empty())?;
        let mut header = file_header(binary.len() as u64, 0o755);
        tar.append_data(&mut header, "rootfs/bin/busybox", binary.as_slice())?;
        for applet in applets.lines().map(str::trim) {
            // Plain names only (`[` and `[[` included); never a path.
            if applet.is_empty() || applet == "busybox" || applet.contains('/') {
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, format!("rootfs/bin/{applet}"), "busybox")?;
        }
        tar.into_inner()
    };
    build().map_err(|e| ExecError::InvalidSpec(format!("build the busybox image context: {e}")))
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(mode);
    header
}

fn dir_header(mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(mode);
    header
}
