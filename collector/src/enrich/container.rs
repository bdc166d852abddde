//! The container and the Kubernetes pod of a process, from its cgroup paths.
//!
//! Every runtime puts a container in a cgroup named after its 64-hex-digit id, each with its
//! own decoration: `/docker/<id>` (cgroupfs driver), `docker-<id>.scope`,
//! `cri-containerd-<id>.scope`, `crio-<id>.scope` or `libpod-<id>.scope` (systemd driver).
//! The kubelet nests them under `/kubepods/<qos>/pod<uid>/` (cgroupfs) or
//! `kubepods-<qos>-pod<uid>.slice` (systemd, with `_` for `-` in the uid).
//!
//! The paths must be the ones the host sees: synspan reads `/proc/<pid>/cgroup` in its own
//! cgroup namespace, which has to be the host's, or paths come out relative to it.

/// The container id: the deepest cgroup directory that names one, in the first path that has
/// one.
pub(crate) fn container_id(cgroup_paths: &[String]) -> Option<String> {
    cgroup_paths.iter().find_map(|path| {
        path.rsplit('/')
            .find_map(container_id_in_segment)
            .map(str::to_owned)
    })
}

fn container_id_in_segment(segment: &str) -> Option<&str> {
    // systemd on cgroup v1 can name the scope `<slice>:<prefix>:<id>`.
    let name = segment.rsplit(':').next()?;
    let name = name.strip_suffix(".scope").unwrap_or(name);
    // conmon, the monitor of CRI-O and podman, runs beside the container, not in it.
    if name.starts_with("crio-conmon-") || name.starts_with("libpod-conmon-") {
        return None;
    }
    let id = ["docker-", "cri-containerd-", "crio-", "libpod-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    is_container_id(id).then_some(id)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The UID of the Kubernetes pod, from a path under the kubelet's `kubepods` cgroup.
pub(crate) fn k8s_pod_uid(cgroup_paths: &[String]) -> Option<String> {
    cgroup_paths
        .iter()
        .filter(|path| path.contains("kubepods"))
        .find_map(|path| path.split('/').find_map(pod_uid_in_segment))
}

fn pod_uid_in_segment(segment: &str) -> Option<String> {
    // `<slice>:<prefix>:<id>`, as above.
    let segment = segment.split(':').next()?;
    if let Some(uid) = segment.strip_prefix("pod")
        && is_pod_uid(uid)
    {
        return Some(uid.to_owned());
    }
    // A systemd unit name cannot hold `-` freely, so the kubelet writes the uid with `_`.
    let (_, uid) = segment.strip_suffix(".slice")?.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID, or 32 hex digits: the kubelet names a static pod by a hash of its manifest.
fn is_pod_uid(s: &str) -> bool {
    let hex = |part: &str| part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let parts: Vec<&str> = s.split('-').collect();
    let lengths: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    (lengths == [8, 4, 4, 4, 12] || lengths == [32]) && parts.iter().all(|p| hex(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f6b2a9c1d0e4f5a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a";
    const UID: &str = "5b1d0a2e-8c3f-4e6a-9b7d-1f2e3a4b5c6d";
    const UID_: &str = "5b1d0a2e_8c3f_4e6a_9b7d_1f2e3a4b5c6d";
    const STATIC_UID: &str = "0f8bd3f5b0d6a0f4e1c0b5d3e5a7c9e1";

    fn paths(template: &str) -> Vec<String> {
        template
            .lines()
            .map(|line| {
                line.replace("{id}", ID)
                    .replace("{uid_}", UID_)
                    .replace("{uid}", UID)
            })
            .collect()
    }

    #[test]
    fn container_and_pod_per_runtime() {
        // (runtime and driver, cgroup paths, container id found, pod uid found)
        let cases: &[(&str, &str, bool, Option<&str>)] = &[
            ("docker, cgroupfs, v1", "/docker/{id}", true, None),
            (
                "docker, systemd, v2",
                "/system.slice/docker-{id}.scope",
                true,
                None,
            ),
            (
                "docker, systemd inside the container",
                "/system.slice/docker-{id}.scope/init.scope",
                true,
                None,
            ),
            (
                "docker, v1 hybrid: several controllers, then the unified line",
                "/docker/{id}\n/docker/{id}\n/",
                true,
                None,
            ),
            (
                "containerd, kubelet cgroupfs",
                "/kubepods/burstable/pod{uid}/{id}",
                true,
                Some(UID),
            ),
            (
                "containerd, kubelet cgroupfs, guaranteed QoS",
                "/kubepods/pod{uid}/{id}",
                true,
                Some(UID),
            ),
            (
                "containerd, kubelet systemd, v2",
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope",
                true,
                Some(UID),
            ),
            (
                "containerd, kubelet systemd, v1 colon form",
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice:cri-containerd:{id}",
                true,
                Some(UID),
            ),
            (
                "containerd, kind (kubelet in a nested slice)",
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{id}.scope",
                true,
                Some(UID),
            ),
            (
                "containerd, pod sandbox (pause) is a container too",
                "/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{id}.scope",
                true,
                Some(UID),
            ),
            (
                "cri-o, systemd",
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{id}.scope",
                true,
                Some(UID),
            ),
            (
                "cri-o conmon: in the pod, not in a container",
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{id}.scope",
                false,
                Some(UID),
            ),
            (
                "podman, rootful, systemd",
                "/machine.slice/libpod-{id}.scope/container",
                true,
                None,
            ),
            (
                "podman, rootless",
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope",
                true,
                None,
            ),
            (
                "podman conmon",
                "/machine.slice/libpod-conmon-{id}.scope",
                false,
                None,
            ),
            ("podman, cgroupfs", "/libpod_parent/libpod-{id}", true, None),
            (
                "host: login session",
                "/user.slice/user-1000.slice/session-3.scope",
                false,
                None,
            ),
            ("host: service", "/system.slice/sshd.service", false, None),
            ("host: root and init", "/\n/init.scope", false, None),
            (
                "kubelet's QoS slice itself",
                "/kubepods.slice/kubepods-burstable.slice",
                false,
                None,
            ),
        ];
        for &(name, template, has_id, uid) in cases {
            let paths = paths(template);
            let expected_id = has_id.then(|| ID.to_owned());
            assert_eq!(container_id(&paths), expected_id, "{name}");
            assert_eq!(k8s_pod_uid(&paths).as_deref(), uid, "{name}");
        }
    }

    #[test]
    fn static_pod_uid_is_a_hash() {
        let cgroupfs = vec![format!("/kubepods/burstable/pod{STATIC_UID}/{ID}")];
        assert_eq!(k8s_pod_uid(&cgroupfs).as_deref(), Some(STATIC_UID));
        let systemd = vec![format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{ID}.scope"
        )];
        assert_eq!(k8s_pod_uid(&systemd).as_deref(), Some(STATIC_UID));
    }

    #[test]
    fn deepest_container_wins_and_lookalikes_do_not_count() {
        let other = "a".repeat(64);
        let nested = vec![format!("/docker/{other}/docker/{ID}")];
        assert_eq!(container_id(&nested).as_deref(), Some(ID));

        let upper = vec![format!("/docker/{}", ID.to_uppercase())];
        assert_eq!(container_id(&upper), None);
        let short = vec![format!("/docker/{}", &ID[..63])];
        assert_eq!(container_id(&short), None);
        let long = vec![format!("/docker/{ID}0")];
        assert_eq!(container_id(&long), None);
        let unknown_prefix = vec![format!("/system.slice/rkt-{ID}.scope")];
        assert_eq!(container_id(&unknown_prefix), None);
        assert_eq!(container_id(&[]), None);

        // A pod-looking directory outside kubepods is not a pod.
        let not_k8s = vec![format!("/system.slice/pod{UID}")];
        assert_eq!(k8s_pod_uid(&not_k8s), None);
        let bad_uid = vec!["/kubepods/burstable/podnot-a-uid/x".to_owned()];
        assert_eq!(k8s_pod_uid(&bad_uid), None);
    }
}
