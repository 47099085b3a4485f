"""Power control on the regional node (issue #21): BMC drivers (Redfish
through sushy, IPMI through pyghmi), the pure error mapping, and the worker
that carries out its IDC's power requests (:mod:`bootsvc.power.worker`)."""
