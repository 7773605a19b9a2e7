//! The docker executor: runs a job in a fresh container through the Docker
//! API. The bundle and the variables file are uploaded into the container (no
//! host bind mounts, so a runner that itself runs in a container works), the
//! output is read from the container's log from its first byte, following
//! it until the container stops (one source, so no byte is missed or read
//! twice, as switching from replayed logs to an attached stream can), and
//! the container is removed whatever happens. The daemon's log driver must
//! be one that can be read back (json-file, the default; local; journald).

use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::StreamExt;
use muster_common::bundle::{Bundle, Entry};
use muster_common::plan::JobPlan;
use tokio_util::sync::CancellationToken;

use crate::executor::{
    artifacts_from, stop_requested, timeout_of, Cleanup, Collected, ExecError, Outcome, Prepared,
    Ran, MAX_ARTIFACT_BYTES,
};
use crate::session::{LogSink, Stream};

/// Where the workspace is in the container, as in Polycrate.
pub const CONTAINER_WORKSPACE: &str = "/workspace";
const CONTAINER_VARS: &str = "/muster/vars.json";

#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
    default_image: String,
    stop_grace: Duration,
}

impl DockerExecutor {
    /// Connects to the local daemon and agrees on an API version with it.
    /// A stopped job's container gets `stop_grace` between SIGTERM and SIGKILL.
    pub async fn connect(default_image: String, stop_grace: Duration) -> Result<Self, ExecError> {
        let docker = Docker::connect_with_local_defaults()?
            .negotiate_version()
            .await?;
        docker.ping().await?;
        Ok(DockerExecutor {
            docker,
            default_image,
            stop_grace,
        })
    }

    pub fn stop_grace(&self) -> Duration {
        self.stop_grace
    }

    pub fn image_for(&self, plan: &JobPlan) -> String {
        plan.image
            .clone()
            .unwrap_or_else(|| self.default_image.clone())
    }

    /// Makes sure the image is present (pulling it if not) and names its digest.
    pub async fn prepare(&self, image: &str) -> Result<Prepared, ExecError> {
        let inspect = match self.docker.inspect_image(image).await {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                let options = CreateImageOptionsBuilder::new().from_image(image).build();
                let mut pull = self.docker.create_image(Some(options), None, None);
                while let Some(step) = pull.next().await {
                    step.map_err(|e| ExecError::ImageUnavailable {
                        image: image.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
                self.docker.inspect_image(image).await?
            }
            Err(e) => return Err(e.into()),
        };
        let digest = inspect
            .repo_digests
            .and_then(|d| d.into_iter().next())
            .and_then(|d| d.split_once('@').map(|(_, digest)| digest.to_owned()))
            .or(inspect.id)
            .unwrap_or_default();
        Ok(Prepared {
            executor: "docker",
            image: image.to_owned(),
            image_digest: digest,
            note: None,
        })
    }

    /// Runs the job to its end, streaming output into `sink`; stops the
    /// container (SIGTERM, the grace, SIGKILL) when `cancel` fires or the
    /// plan's timeout passes.
    pub async fn run_collecting(
        &self,
        run_id: &str,
        image: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Ran, ExecError> {
        let mut env: Vec<String> = plan
            .environment(CONTAINER_WORKSPACE)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("IN_CONTAINER=true".into());
        env.push(format!("MUSTER_RUN_ID={run_id}"));
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(plan.argv(CONTAINER_WORKSPACE, CONTAINER_VARS)),
            working_dir: Some(plan.working_dir(CONTAINER_WORKSPACE)),
            env: Some(env),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            labels: Some(
                [("io.muster.run-id".to_owned(), run_id.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            host_config: Some(HostConfig {
                init: None,
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("muster-run-{run_id}");
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await?;
        let id = created.id;
        let result = self.run_created(&id, plan, bundle, sink, cancel).await;
        let remove = remove_container(self.docker.clone(), run_id.to_owned(), id.clone());
        match result {
            Ok(outcome) => {
                let collected = self.collect(&id, plan, bundle).await;
                Ok((outcome, collected, Cleanup::new(remove)))
            }
            Err(error) => {
                remove.await;
                Err(error)
            }
        }
    }

    async fn run_created(
        &self,
        id: &str,
        plan: &JobPlan,
        bundle: &Bundle,
        sink: &LogSink,
        cancel: CancellationToken,
    ) -> Result<Outcome, ExecError> {
        let vars = serde_json::to_vec_pretty(&plan.vars_for(CONTAINER_WORKSPACE))
            .map_err(|e| ExecError::Prepare(e.to_string()))?;
        // One upload: the daemon mounts the container's filesystem and
        // extracts into it in a helper process per upload, which costs more
        // than a hundred milliseconds on a busy host.
        let tar = job_tar(bundle, &vars).map_err(|e| ExecError::Prepare(e.to_string()))?;
        let options = UploadToContainerOptionsBuilder::new().path("/").build();
        self.docker
            .upload_to_container(id, Some(options), bollard::body_full(Bytes::from(tar)))
            .await?;

        self.docker.start_container(id, None).await?;
        let follow = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let output = self.docker.logs(id, Some(follow));

        let output = output
            .take_while(|item| {
                let more = match item {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(container = %id, %error, "reading the job's output failed");
                        false
                    }
                };
                std::future::ready(more)
            })
            .filter_map(|item| {
                std::future::ready(match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        Some((Stream::Stdout, message))
                    }
                    Ok(LogOutput::StdErr { message }) => Some((Stream::Stderr, message)),
                    Ok(LogOutput::StdIn { .. }) | Err(_) => None,
                })
            });
        // The output ends when the container stops, by itself or because
        // the stopper below stopped it; the stopper gives up once it has.
        let ended = CancellationToken::new();
        let pump = async {
            crate::output::forward(output, sink).await;
            ended.cancel();
        };
        let stopper = async {
            let reason = tokio::select! {
                _ = ended.cancelled() => return None,
                reason = stop_requested(&cancel, timeout_of(plan)) => reason,
            };
            let grace = i32::try_from(self.stop_grace.as_secs()).unwrap_or(i32::MAX);
            let stop = StopContainerOptionsBuilder::new().t(grace).build();
            if let Err(error) = self.docker.stop_container(id, Some(stop)).await {
                tracing::warn!(container = %id, %error, "stopping the job's container failed");
            }
            Some(reason)
        };
        let ((), stopped) = tokio::join!(pump, stopper);

        let exit_code = match self.docker.wait_container(id, None).next().await {
            Some(Ok(response)) => response.status_code,
            // bollard reports a non-zero exit as an error that carries the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(e.into()),
            None => {
                let inspect = self.docker.inspect_container(id, None).await?;
                inspect.state.and_then(|s| s.exit_code).unwrap_or(-1)
            }
        };
        Ok(Outcome { exit_code, stopped })
    }
}

impl DockerExecutor {
    /// The files the job left in its block's artifacts directory, read from
    /// the stopped container.
    async fn collect(&self, id: &str, plan: &JobPlan, bundle: &Bundle) -> Collected {
        let path = format!("{CONTAINER_WORKSPACE}/artifacts/blocks/{}", plan.block);
        let options = DownloadFromContainerOptionsBuilder::new()
            .path(&path)
            .build();
        let mut stream = self.docker.download_from_container(id, Some(options));
        let mut tar = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    tar.extend_from_slice(&bytes);
                    if tar.len() as u64 > MAX_ARTIFACT_BYTES {
                        return Err(format!(
                            "the job's artifacts exceed {} MiB",
                            MAX_ARTIFACT_BYTES >> 20
                        ));
                    }
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                Err(e) => return Err(format!("reading the artifacts from the container: {e}")),
            }
        }
        let bundle = bundle.clone();
        let block = plan.block.clone();
        tokio::task::spawn_blocking(move || artifacts_from(files_of_tar(&tar)?, &bundle, &block))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// The regular files of a tar from the Docker API, relative to its top
/// directory (the artifacts directory itself); anything else is skipped.
fn files_of_tar(tar: &[u8]) -> Result<Vec<(String, Entry)>, String> {
    let mut archive = tar::Archive::new(tar);
    let mut files = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the artifacts archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the artifacts archive: {e}"))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| format!("reading the artifacts archive: {e}"))?
            .components()
            .skip(1)
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        if path.is_empty() {
            continue;
        }
        let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)
            .map_err(|e| format!("reading the artifacts archive: {e}"))?;
        files.push((path, Entry::File { data, executable }));
    }
    Ok(files)
}

/// The tar uploaded into a job's container at `/`: the workspace under
/// [`CONTAINER_WORKSPACE`] and `vars` at [`CONTAINER_VARS`].
fn job_tar(bundle: &Bundle, vars: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = Vec::new();
    bundle.write_tar_with_prefix(CONTAINER_WORKSPACE.trim_start_matches('/'), &mut tar)?;
    // The workspace's archive ends with two zero blocks, which end any
    // archive for its reader: the vars file goes in their place.
    let end = tar
        .len()
        .checked_sub(1024)
        .filter(|&end| tar[end..].iter().all(|&b| b == 0))
        .ok_or_else(|| std::io::Error::other("the workspace archive lacks its end marker"))?;
    tar.truncate(end);
    append_file(tar, CONTAINER_VARS.trim_start_matches('/'), vars)
}

/// Removes the job's container (stopped or not) and its anonymous volumes.
async fn remove_container(docker: Docker, run_id: String, id: String) {
    let remove = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    if let Err(error) = docker.remove_container(&id, Some(remove)).await {
        tracing::warn!(run_id, container = %id, %error, "could not remove the job's container");
    }
}

/// `archive` (a tar without its end marker) with the file `path` (and its
/// directory) appended, ended.
fn append_file(archive: Vec<u8>, path: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(archive);
    if let Some((dir, _)) = path.rsplit_once('/') {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        builder.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(0);
    builder.append_data(&mut header, path, data)?;
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_and_the_vars_go_up_in_one_archive() {
        let bundle = Bundle::from_entries(vec![(
            "blocks/b/site.yml".to_owned(),
            Entry::File {
                data: b"- hosts: localhost\n".to_vec(),
                executable: false,
            },
        )])
        .unwrap();
        let tar = job_tar(&bundle, b"{\"a\": 1}").unwrap();
        // A reader stops at the first end marker: everything must come before it.
        let mut archive = tar::Archive::new(&tar[..]);
        let mut found = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = String::new();
            std::io::Read::read_to_string(&mut entry, &mut data).unwrap();
            found.push((path, data));
        }
        let file = |p: &str| {
            found
                .iter()
                .find(|(path, _)| path == p)
                .map(|(_, d)| d.as_str())
        };
        assert_eq!(
            file("workspace/blocks/b/site.yml"),
            Some("- hosts: localhost\n")
        );
        assert_eq!(file("muster/vars.json"), Some("{\"a\": 1}"));
        assert_eq!(file("muster/"), Some(""), "{found:?}");
        assert_eq!(tar.len() % 512, 0);
        assert!(tar.ends_with(&[0; 1024]));
    }
}
