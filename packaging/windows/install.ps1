# Install Studio for this user on Windows. NOT YET VERIFIED ON WINDOWS: written and reviewed against the
# Linux installer (packaging/linux/install.sh, which is tested), following the same rules; please report
# what breaks. Needs only Python 3.10+ (python.org; the `py` launcher is used when present) and the
# package index. No administrator rights.
#
#   powershell -ExecutionPolicy Bypass -File install.ps1 -From studio-X.Y.Z-py3-none-any.whl [-Root DIR] [-Python PATH]
#                                                        [-TorchBuild cpu|cu126|cu128|cu130|pypi] [-TorchFindLinks DIR]
#
# ROOT (default %LOCALAPPDATA%\studio-app) holds tools\ (uv and the updater), envs\<version>-<n>, and
# current.txt / previous.txt naming the active and the previous environment (symbolic links need
# administrator rights on Windows). The torch build follows the NVIDIA driver (nvidia-smi), else CPU.
# `studio update` and `studio update --rollback` work as on Linux. A Start menu shortcut runs
# ROOT\bin\studio.cmd, which starts whatever environment is current.
# Models, chats and outputs live in %LOCALAPPDATA%\Studio and Pictures\Studio, never in ROOT.
param(
    [Parameter(Mandatory = $true)][string]$From,  # a Studio wheel: PyPI's "studio" is an unrelated program
    [string]$Root = (Join-Path $env:LOCALAPPDATA "studio-app"),
    [string]$Python = "",
    [string]$TorchBuild = "",
    [string]$TorchFindLinks = ""
)
$ErrorActionPreference = "Stop"
$UvVersion = "0.13.9"

function Say($msg) { Write-Host "studio install: $msg" }
function Die($msg) { Write-Host "studio install: $msg" -ForegroundColor Red; exit 1 }

function Find-Python {
    $candidates = @()
    if ($Python) { $candidates += ,@($Python) }
    else {
        foreach ($v in "3.13", "3.12", "3.11", "3.10") { $candidates += ,@("py", "-$v") }
        $candidates += ,@("python")
    }
    foreach ($c in $candidates) {
        try {
            $rest = if ($c.Length -gt 1) { $c[1..($c.Length - 1)] } else { @() }
            $exe = & $c[0] @rest -c "import sys; print(sys.executable) if sys.version_info >= (3, 10) else sys.exit(1)" 2>$null
            if ($LASTEXITCODE -eq 0 -and $exe) { return $exe.Trim() }
        } catch { }
    }
    return $null
}

if (Test-Path $From -PathType Leaf) { $From = (Resolve-Path $From).Path }
New-Item -ItemType Directory -Force -Path $Root | Out-Null
$Root = (Resolve-Path $Root).Path
$py = Find-Python
if (-not $py) { Die "Studio needs Python 3.10 or newer: install it from python.org (tick 'py launcher'), or name one with -Python." }
Say "building on $py"

# 1. tools\: uv and the updater (Studio without dependencies; studio.cli.update uses the standard library only).
$tools = Join-Path $Root "tools"
$uv = Join-Path $tools "Scripts\uv.exe"
if (-not (Test-Path $uv)) {
    & $py -m venv $tools; if ($LASTEXITCODE -ne 0) { Die "$py cannot create virtual environments." }
    Say "installing uv $UvVersion from the package index"
    & (Join-Path $tools "Scripts\python.exe") -m pip install --quiet --disable-pip-version-check "uv==$UvVersion"
    if ($LASTEXITCODE -ne 0) { Die "could not install uv from the package index: check the network connection." }
}
& $uv pip install --quiet --python (Join-Path $tools "Scripts\python.exe") --no-deps --reinstall $From
if ($LASTEXITCODE -ne 0) { Die "could not get Studio ($From) from the package index or that file." }

# 2. the environment: built, checked with `studio doctor --check`, then made current (or nothing changes).
$updateArgs = @("-m", "studio.cli.update", "--root", $Root, "--from", $From, "--python", $py)
if ($TorchBuild) { $updateArgs += @("--torch", "--torch-build", $TorchBuild) }
if ($TorchFindLinks) { $updateArgs += @("--torch-find-links", $TorchFindLinks) }
& (Join-Path $tools "Scripts\python.exe") @updateArgs
if ($LASTEXITCODE -ne 0) { Die "the install did not finish; nothing was switched. The lines above say what failed." }
$current = Join-Path $Root (Get-Content (Join-Path $Root "current.txt") -Raw).Trim()
$assets = Join-Path $current "share\studio\assets"

# 3. the launcher and the Start menu shortcut.
$bin = Join-Path $Root "bin"
New-Item -ItemType Directory -Force -Path $bin | Out-Null
$launcher = Join-Path $bin "studio.cmd"
@"
@echo off
rem Studio's launcher: runs whichever environment current.txt names (studio update / --rollback change it).
set /p STUDIO_ENV=<"%~dp0..\current.txt"
"%~dp0..\%STUDIO_ENV%\Scripts\studio.exe" %*
"@ | Set-Content -Encoding ASCII $launcher
$icon = Join-Path $Root "studio.ico"
Copy-Item (Join-Path $assets "icons\studio.ico") $icon -Force
$programs = Join-Path $env:APPDATA "Microsoft\Windows\Start Menu\Programs"
$shell = New-Object -ComObject WScript.Shell
$link = $shell.CreateShortcut((Join-Path $programs "Studio.lnk"))
$link.TargetPath = $launcher
$link.IconLocation = $icon
$link.WindowStyle = 7  # minimised: the console behind the window stays out of the way
$link.Description = "Images, videos and chat with AI models on your own computer"
$link.Save()

# 4. the uninstaller: keeps models, chats and outputs unless -Purge.
@"
# Remove Studio installed by install.ps1. Keeps models, chats and outputs unless -Purge.
param([switch]`$Purge)
`$root = "$Root"
if (-not (Test-Path (Join-Path `$root "envs")) -or -not (Test-Path (Join-Path `$root "tools"))) { Write-Host "`$root is not a Studio installation"; exit 1 }
`$folders = @{}
try {
    `$cur = Join-Path `$root (Get-Content (Join-Path `$root "current.txt") -Raw).Trim()
    `$json = & (Join-Path `$cur "Scripts\python.exe") -c "import json; from studio.cli.doctor import doctor_report; print(json.dumps(doctor_report()['folders']))"
    (`$json | ConvertFrom-Json).PSObject.Properties | ForEach-Object { `$folders[`$_.Name] = `$_.Value }
} catch { }
if (`$Purge) {
    if (`$folders.Count -eq 0) { Write-Host "Studio no longer runs, so it cannot say where its data is; nothing removed."; exit 1 }
    foreach (`$f in `$folders.GetEnumerator()) { if (Test-Path `$f.Value) { Write-Host "removing `$(`$f.Name): `$(`$f.Value)"; Remove-Item -Recurse -Force `$f.Value } }
}
Remove-Item -Force -ErrorAction SilentlyContinue (Join-Path "$programs" "Studio.lnk")
Set-Location `$env:TEMP
Remove-Item -Recurse -Force `$root
Write-Host "studio uninstall: removed `$root and the Start menu shortcut"
if (-not `$Purge) { foreach (`$f in `$folders.GetEnumerator()) { Write-Host "  kept `$(`$f.Name): `$(`$f.Value)" } }
"@ | Set-Content -Encoding UTF8 (Join-Path $Root "uninstall.ps1")

Say "done: Studio is in the Start menu; from a terminal: $launcher"
Say "update: studio update   back to the previous version: studio update --rollback"
Say "remove: powershell -ExecutionPolicy Bypass -File `"$Root\uninstall.ps1`" (add -Purge to remove models, chats and outputs)"
